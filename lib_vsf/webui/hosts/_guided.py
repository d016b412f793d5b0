"""Shared pieces of the Forge Neo / reForge / UNet adapters: call scopes and the guided call itself.

Host-free (no host imports). The registry skips this module (leading underscore).

A *call scope* tells a replaced module-level attention function which host method it is being called
from. Several hosts route different kinds of attention through the same module-level name (Wan's
self-attention and text cross-attention, the UNet's attn1 and attn2, SD3.5's joint and image-only
attention); counting keys alone is ambiguous when an image happens to have as many tokens as the
text. The adapters therefore wrap the narrow host method that makes the guided call (e.g.
`WanT2VCrossAttention.forward`) so that it opens a scope, and the attention replacement guides only
calls made inside an open scope. Scopes live in a `ContextVar`, so they neither leak across threads
nor survive an exception.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from typing import Any, Callable

import torch

from ...attention import cross_attention, joint_attention
from ...layout import TokenLayout
from ...patching import PatchError, check_callable
from ...state import GuidanceRun

log = logging.getLogger("vsf")


class ScopeState:
    """What an open scope knows about the call it wraps.

    `skip_calls`: attention calls to pass through before the guided one (Wan 2.1 I2V computes its
    image-token attention first). `expected_len`: sequence length of the guided call when the wrapper
    knows it (SD3.5 `_block_mixing`), else None. `text_len`: the text stream length the wrapper saw,
    or None. `used`: the guided call has happened (one guided call per scope when `once`).
    """

    __slots__ = ("skip_calls", "expected_len", "text_len", "once", "used")

    def __init__(self, skip_calls: int = 0, expected_len: int | None = None, text_len: int | None = None,
                 once: bool = False):
        self.skip_calls = skip_calls
        self.expected_len = expected_len
        self.text_len = text_len
        self.once = once
        self.used = False


class CallScope:
    """A named marker that a host method is running; see the module docstring."""

    def __init__(self, name: str):
        self._var: contextvars.ContextVar[ScopeState | None] = contextvars.ContextVar(name, default=None)

    def current(self) -> ScopeState | None:
        """The innermost open scope, or None outside any wrapped method."""
        return self._var.get()

    def wrap(self, method: Callable, make_state: Callable[..., ScopeState | None]) -> Callable:
        """`method` with a scope opened around every call. `make_state(*args, **kwargs)` sees the
        call's arguments and returns the scope's state, or None to leave the call unmarked."""

        @functools.wraps(method)
        def scoped(*args, **kwargs):
            state = make_state(*args, **kwargs)
            token = self._var.set(state)
            try:
                return method(*args, **kwargs)
            finally:
                self._var.reset(token)

        scoped.__vsf_original__ = method  # for diagnostics: what this wrapper stands in for
        return scoped

    def take(self) -> ScopeState | None:
        """The open scope if the current attention call is its guided one, else None. Counts down
        `skip_calls` and marks `once` scopes as used, so call it exactly once per attention call."""
        state = self._var.get()
        if state is None or (state.once and state.used):
            return None
        if state.skip_calls > 0:
            state.skip_calls -= 1
            return None
        state.used = True
        return state


def batch_fits(run: GuidanceRun, batch: int) -> bool:
    """The run's negative mask (if any) has one row or one row per sample of this call."""
    mask = run.negative_mask
    return mask is None or mask.shape[0] in (1, batch)


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log `message` the first time `key` is seen in this process (no log spam per attention call)."""
    if key not in _warned:
        _warned.add(key)
        log.warning("[VSF] %s", message)


def guided_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: TokenLayout,
                run: GuidanceRun, *, joint: bool, skip_reshape: bool = False,
                skip_output_reshape: bool = False) -> torch.Tensor:
    """Guided attention in the host's calling convention.

    Inputs are `[B, L, H*D]` (or `[B, H, L, D]` with `skip_reshape`), the output `[B, L, H*D]` (or
    `[B, H, L, D]` with `skip_output_reshape`), as the ComfyUI-style `attention_function` /
    `optimized_attention` of every Forge-family host does. Counts `run.calls`.
    """
    if not skip_reshape:
        dim_head = q.shape[-1] // heads
        q, k, v = (_to_heads(t, heads, dim_head) for t in (q, k, v))
    out = attend(joint_attention if joint else cross_attention, q, k, v, layout, run)
    run.calls += 1
    if skip_output_reshape:
        return out
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


def attend(attention: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
           run: GuidanceRun) -> torch.Tensor:
    """`attention(q, k, v, layout, run.guidance())`, handing over the run's negative-map recorder only
    while "Show where the negative acts" records: without it the call is exactly the one without the map."""
    if run.negative_map is None:
        return attention(q, k, v, layout, run.guidance())
    return attention(q, k, v, layout, run.guidance(), negative_share=run.negative_map)


def _to_heads(t: torch.Tensor, heads: int, dim_head: int) -> torch.Tensor:
    # As the hosts do: any `[B, L, ...]` layout of H*D channels (reForge's MMDiT passes v as [B, L, H, D]).
    return t.reshape(t.shape[0], -1, heads, dim_head).transpose(1, 2)


def split_mask_arg(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The `mask` argument of an `attention_function(q, k, v, heads, mask=None, ...)` call as the
    caller passed it (positionally after `heads`, or by name)."""
    if "mask" in kwargs:
        return kwargs["mask"]
    return args[0] if args else None


def diffusion_model(sd_model: Any) -> Any:
    """The host's diffusion network (UNet / DiT) behind a WebUI model object, or None."""
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    inner = getattr(getattr(unet, "model", None), "diffusion_model", None)
    if inner is None:
        inner = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    return inner


def class_is(obj: Any, module: str, *names: str) -> bool:
    """`type(obj)` (or a base class) is `module.<one of names>`; no import, so safe on any host."""
    if obj is None:
        return False
    return any(c.__module__ == module and c.__name__ in names for c in type(obj).__mro__)


def is_forge_neo() -> bool:
    """Running on Forge Neo (`modules_forge/forge_version.py` says "neo")."""
    try:
        from modules_forge import forge_version  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - not a Forge-family host
        return False
    return str(getattr(forge_version, "version", "")).lower().startswith("neo")


def check_attention_function(owner: Any, name: str, keywords: tuple[str, ...] = ("mask",)) -> Callable:
    """`owner.name` if it is an attention function `(q, k, v, heads, ...)` accepting `keywords` by
    name, else PatchError. The first four parameters are checked by position only: hosts pick the
    implementation at start-up and some spell them `query, key, value` (Forge's sub-quadratic kernel)."""
    target = check_callable(owner, name, keywords)
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return target
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 4 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        where = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"
        raise PatchError(f"{where} does not take (q, k, v, heads) (host version not supported)")
    return target


def make_scoped_cross_attention(original: Callable, run: GuidanceRun, scope: CallScope) -> Callable:
    """Replacement for a host's module-level `attention_function(q, k, v, heads, ...)` carrying
    cross-attention: guided inside an open `scope` when the keys are exactly the text stream `[P, N]`
    (no mask, the host's own layout, a batch the negative rows fit); the original otherwise."""

    def scoped_cross_attention(q, k, v, heads, *args, **kwargs):
        if (scope.take() is None or run.negative_len == 0 or k.shape[1] != run.text_len
                or split_mask_arg(args, kwargs) is not None or kwargs.get("skip_reshape")
                or not batch_fits(run, q.shape[0])):
            return original(q, k, v, heads, *args, **kwargs)
        return guided_call(q, k, v, heads, run.cross_layout(total=k.shape[1]), run, joint=False,
                           skip_output_reshape=kwargs.get("skip_output_reshape", False))

    scoped_cross_attention.__vsf_original__ = original
    return scoped_cross_attention
