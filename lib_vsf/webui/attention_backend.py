"""Which attention library the host runs its unguided calls on, handed to the core as a preference.

VSF's fast path needs one big unmasked attention pass with log-sum-exp; it should run on the kernel the
user picked for the host (their speed, their memory). The host's choice is read from what it already
decided, never by importing anything new (only modules the host has loaded, via `sys.modules`):

- Forge and Forge Neo: `backend.attention.attention_function` is `attention_sage`, `attention_flash`,
  `attention_xformers` or `attention_pytorch` (Neo: `--sage`/`--flash`/`--xformers`, `--disable-*`,
  `--use-pytorch-cross-attention`; Forge: `--attention-*` and `--disable-xformers`, which end in the same
  function); split / sub-quadratic / basic attention give no preference.
- reForge (ComfyUI-style): `ldm_patched.ldm.modules.attention.optimized_attention`, same names.
- AUTOMATIC1111: the cross-attention optimization it applied (`modules.sd_hijack.model_hijack
  .optimization_method`: "xformers", "sdp", "sdp-no-mem", ...), else the `--xformers` /
  `--force-enable-xformers` command-line flags (`modules.shared.cmd_opts`).

`prefer_host_backend(ctx)` sets `lib_vsf.attention.backends.set_preferred_backend` for one sampling pass
and registers the undo; `used_backend_note()` says, after the pass, which kernel VSF's big pass ran on
when that is not what the host uses.
"""
from __future__ import annotations

import sys
from typing import Any

from ..attention import backends

HOST_FUNCTIONS = {  # Forge / Neo / reForge attention function name -> core backend name
    "attention_sage": "sage", "attention_flash": "flash_attn", "attention_xformers": "xformers",
    "attention_pytorch": "sdpa",
}
A1111_OPTIMIZATIONS = {"xformers": "xformers", "sdp": "sdpa", "sdp-no-mem": "sdpa"}


def host_attention_backend() -> str | None:
    """The core backend name matching the host's attention (`backends.PREFERENCES`), or None when the
    host uses something else (split, sub-quadratic, ...) or cannot be read."""
    forge = sys.modules.get("backend.attention")
    if forge is not None:
        return HOST_FUNCTIONS.get(getattr(getattr(forge, "attention_function", None), "__name__", None))
    comfy = sys.modules.get("ldm_patched.ldm.modules.attention")
    if comfy is not None:
        return HOST_FUNCTIONS.get(getattr(getattr(comfy, "optimized_attention", None), "__name__", None))
    hijack = sys.modules.get("modules.sd_hijack")
    method = getattr(getattr(hijack, "model_hijack", None), "optimization_method", None)
    if isinstance(method, str):
        return A1111_OPTIMIZATIONS.get(method.lower())
    opts = getattr(sys.modules.get("modules.shared"), "cmd_opts", None)
    if opts is not None and (getattr(opts, "xformers", False) or getattr(opts, "force_enable_xformers", False)):
        return "xformers"
    return None


def prefer_host_backend(ctx: Any) -> str | None:
    """Prefer the host's attention library for this pass (undone with the pass); returns its name."""
    name = host_attention_backend()
    previous = backends.set_preferred_backend(name)
    ctx.add_undo(lambda: backends.set_preferred_backend(previous))
    backends.take_used()  # count this pass's calls only
    return name


def used_backend_note(host: str | None) -> str | None:
    """After a pass: a note when the host runs a library (flash-attn, xformers, SageAttention) and VSF's
    big attention pass did not run on it (not installed with LSE output, failed its check), or did."""
    used = backends.take_used()
    if host not in backends.LIBRARY_BACKENDS or not used:
        return None
    if used == (host,):
        return f"VSF ran its attention on your backend, {backends.label(host)}, with log-sum-exp."
    others = ", ".join(backends.label(n) for n in used if n != host)
    return (f"VSF could not use your attention backend, {backends.label(host)}, for its guided attention "
            f"({backends.unavailable_reason(host) if host not in used else 'on some calls'}); it used {others}.")
