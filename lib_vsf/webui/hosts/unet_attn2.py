"""SD1.x / SD2.x / SDXL UNets: VSF in the text cross-attention `attn2` (paper eq. 9), on every host.

Image queries attend to `[P, N]`: the positive context as the host encodes it (`77 * k` tokens: k
chunks of BOS + 75 tokens + EOS, padded) followed by the negative prompt *unpadded*: every chunk of the
negative keeps BOS + its tokens + EOS, only the last chunk is cut after its EOS (`clip_keep_lengths`,
`trim_clip_chunks`). Padding tokens of the negative are never flipped (VSF-SPEC "Negative text").

Where attention happens:
- Forge and Forge Neo (`backend/nn/unet.py`) and reForge (`ldm_patched/ldm/modules/attention.py`), all
  ComfyUI-derived: `CrossAttention.forward(x, context=None, value=None, mask=None, ...)` projects q/k/v
  and calls its module's attention name (`attention_function(q, k, v, heads, mask)`, reForge
  `optimized_attention(q, k, v, heads, attn_precision=...)`) with `[B, L, H*D]`. Self-attention `attn1`
  goes through the same class and name. The patch replaces the module-level name and wraps
  `CrossAttention.forward` to open a call scope when it gets a separate `context` (attn2; attn1 passes
  no context, or `x` itself): only scoped calls whose key count is the announced text length are
  guided, so an image level with as many tokens as the text is never mistaken for attn2.
- AUTOMATIC1111 (`ldm.modules.attention.CrossAttention`, SDXL `sgm.modules.attention.CrossAttention`):
  the cross-attention optimisation replaces `CrossAttention.forward` itself, with no module-level name
  below it, so the patch wraps that `forward` and computes guided calls itself from the module's
  `to_q/to_k/to_v/to_out` (hypernetworks applied to the context as A1111 does).

Not covered: blocks where another extension registered a ComfyUI `patches_replace["attn2"]` (IP-Adapter
style; the host then never calls `attn2.forward`), and masked attn2 calls: those run unguided.

Emphasis `(word:1.3)` in the negative prompt: the host's own prompt encoder applies it while encoding
the padded chunk (A1111/Forge "Original" emphasis scales each token's embedding, then restores the
chunk mean); trimming keeps those scaled rows. A weight above 1 therefore makes that token's key and
value larger, so it takes more of the attention and is subtracted more; a weight below 1 does the
opposite. Nothing here re-weights.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Sequence

import torch

from ...attention import cross_attention
from ...patching import AttributePatch, PatchError, check_callable
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _forge_sampling, _negative_text
from ._guided import (CallScope, ScopeState, attend, batch_fits, check_attention_function, class_is, diffusion_model,
                      is_forge_neo, make_scoped_cross_attention)
from .base import HostAdapter, SamplingContext, append_negative, real_length

CHUNK_TOKENS = 75  # prompt tokens per CLIP chunk; a chunk is BOS + 75 + EOS = 77 positions
CHUNK_LEN = CHUNK_TOKENS + 2

ATTN2_SCOPE = CallScope("vsf_unet_attn2")


# -- host-free text-stream arithmetic ------------------------------------------------------------------

def clip_keep_lengths(token_count: int, chunk_tokens: int = CHUNK_TOKENS) -> list[int]:
    """Positions to keep from each 77-position chunk of a CLIP encoding of `token_count` prompt tokens.

    Full chunks are kept whole (BOS + 75 tokens + EOS); the last chunk keeps BOS + its tokens + EOS.
    An empty prompt keeps nothing (`[]`): a negative of BOS + EOS only has no tokens to guide with.
    """
    if token_count < 0:
        raise ValueError(f"token count must be >= 0, got {token_count}")
    if token_count == 0:
        return []
    chunks = math.ceil(token_count / chunk_tokens)
    last = token_count - (chunks - 1) * chunk_tokens
    return [chunk_tokens + 2] * (chunks - 1) + [last + 2]


def trim_clip_chunks(embeds: torch.Tensor, keep: Sequence[int], chunk_len: int = CHUNK_LEN) -> torch.Tensor:
    """`[chunks * chunk_len, E]` encoding of one prompt -> `[sum(keep), E]`: the first `keep[i]` rows
    of chunk `i`. Extra chunks of the encoding (the host pads a batch to its longest prompt) are dropped."""
    if embeds.shape[0] % chunk_len:
        raise ValueError(f"encoding of {embeds.shape[0]} positions is not whole chunks of {chunk_len}")
    if len(keep) > embeds.shape[0] // chunk_len:
        raise ValueError(f"{len(keep)} chunks to keep, encoding has {embeds.shape[0] // chunk_len}")
    if any(not 0 <= n <= chunk_len for n in keep):
        raise ValueError(f"keep lengths {list(keep)} must lie in [0, {chunk_len}]")
    parts = [embeds[i * chunk_len: i * chunk_len + n] for i, n in enumerate(keep)]
    return torch.cat(parts) if parts else embeds[:0]


def positive_chunks(context_len: int, chunk_len: int = CHUNK_LEN) -> int:
    """Number of 77-position chunks of a padded positive context (raises if it is not whole chunks)."""
    if context_len <= 0 or context_len % chunk_len:
        raise ValueError(f"positive context of {context_len} positions is not whole chunks of {chunk_len}")
    return context_len // chunk_len


def clip_engine(sd_model: Any) -> Any:
    """The object that tokenizes prompts into 77-position CLIP chunks (`tokenize_line(text)` ->
    `(chunks, token_count)`, `chunk.tokens` with BOS/EOS, `id_end`) for a WebUI model: Forge/Neo
    `text_processing_engine[_l|_g]`, A1111/reForge `cond_stage_model` (SD1/2) or the SDXL
    conditioner's CLIP embedders. SDXL's CLIP-L and CLIP-G chunk a prompt identically."""
    names = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g", "cond_stage_model")
    candidates = [getattr(sd_model, name, None) for name in names]
    candidates += list(getattr(getattr(sd_model, "conditioner", None), "embedders", None) or [])
    for engine in candidates:
        if callable(getattr(engine, "tokenize_line", None)) and getattr(engine, "id_end", None) is not None:
            return engine
    raise PatchError("no CLIP tokenizer with tokenize_line/id_end on this model (host version not supported)")


def clip_negative(crossattn: torch.Tensor, chunks: Sequence[Any], id_end: int) -> torch.Tensor:
    """`[n, E]` unpadded negative from the host's padded `[1, 77k, E]` encoding of one prompt and the
    chunks its tokenizer made of it: each chunk up to its first EOS (BOS + tokens + EOS). The host
    applied emphasis weights while encoding; the kept rows carry them (see the module docstring)."""
    keep = [real_length(list(chunk.tokens), id_end, has_start=True) for chunk in chunks]
    while keep and keep[-1] == 0:  # a trailing chunk of BOS + EOS only holds no tokens
        keep.pop()
    return trim_clip_chunks(crossattn[0], keep[: crossattn.shape[1] // CHUNK_LEN])


def encode_clip_negatives(p: Any, sd_model: Any, negative_prompts: Sequence[str]) -> NegativeText:
    """Each negative encoded by the host (emphasis, embeddings, clip skip as the user set them), then
    cut to its real tokens; identical prompts are encoded once, empty ones give no tokens."""
    engine = clip_engine(sd_model)

    def encode(prompt: str) -> torch.Tensor:
        crossattn = _negative_text.host_encode(p, sd_model, prompt)["crossattn"]  # encode first: sets the emphasis mode
        chunks, _ = engine.tokenize_line(prompt)
        return clip_negative(crossattn, chunks, engine.id_end)

    return _negative_text.encode_each(negative_prompts, encode)


# -- ComfyUI-style hosts: Forge, Forge Neo, reForge --------------------------------------------------

def _attn2_scope(module, x, context=None, *args, **kwargs) -> ScopeState | None:
    # attn2 always passes the text as `context`; attn1 passes none (or `x` itself under attn1 patches).
    if context is None or context is x:
        return None
    return ScopeState(once=True)


def check_unet_module(module: ModuleType, attention_name: str) -> None:
    """Raise PatchError unless `module` has `CrossAttention.forward(x, context, ...)` and the
    module-level `attention_name(q, k, v, heads, mask, ...)` it calls."""
    check_attention_function(module, attention_name, ("mask",))
    check_callable(check_callable(module, "CrossAttention"), "forward", ("x", "context"))


def make_attn2_attention(original, run: GuidanceRun):
    """Replacement for a UNet module's attention name: guided for attn2 calls over `[P, N]`."""
    return make_scoped_cross_attention(original, run, ATTN2_SCOPE)


def patch_unet(module: ModuleType, attention_name: str, run: GuidanceRun) -> AttributePatch:
    """Checked, unapplied patch of a ComfyUI-style UNet attention file (PatchError if it differs)."""
    check_unet_module(module, attention_name)
    cross = module.CrossAttention
    return (AttributePatch()
            .add(module, attention_name, make_attn2_attention(getattr(module, attention_name), run))
            .add(cross, "forward", ATTN2_SCOPE.wrap(cross.forward, _attn2_scope)))


# -- AUTOMATIC1111: ldm / sgm CrossAttention ---------------------------------------------------------

def _a1111_context_kv(context: torch.Tensor):
    """A1111 applies loaded hypernetworks to the context before k/v; do the same when available."""
    try:
        from modules import shared  # type: ignore[import-not-found]
        from modules.hypernetworks import hypernetwork  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - outside A1111 (tests): no hypernetworks
        return context, context
    return hypernetwork.apply_hypernetworks(getattr(shared, "loaded_hypernetworks", []), context)


def make_a1111_forward(original, run: GuidanceRun):
    """Wrapper for A1111's (hijacked) `CrossAttention.forward(self, x, context=None, mask=None, ...)`:
    guided attn2 calls are computed here from the module's own projections, the rest call `original`."""

    def forward(self, x, context=None, mask=None, **kwargs):
        # sgm passes additional_tokens=None, n_times_crossframe_attn_in_self=0: anything else is not plain attn2
        extra = any(v is not None and not (isinstance(v, (int, float)) and v == 0) for v in kwargs.values())
        if (context is None or context is x or mask is not None or extra or run.negative_len == 0
                or context.shape[1] != run.text_len or not batch_fits(run, x.shape[0])):
            return original(self, x, context=context, mask=mask, **kwargs)
        heads = self.heads
        context_k, context_v = _a1111_context_kv(context)
        q = self.to_q(x)
        k = self.to_k(context_k)
        v = self.to_v(context_v)
        dim_head = q.shape[-1] // heads
        q, k, v = (t.reshape(t.shape[0], -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
        dtype = q.dtype
        k, v = k.to(dtype), v.to(dtype)
        out = attend(cross_attention, q, k, v, run.cross_layout(total=k.shape[2]), run)
        run.calls += 1
        out = out.transpose(1, 2).reshape(x.shape[0], -1, heads * dim_head).to(x.dtype)
        return self.to_out(out)

    forward.__vsf_original__ = original
    return forward


def check_a1111_class(cross_attention_class: type) -> None:
    """Raise PatchError unless the class has `forward(x, context, mask)` (A1111's optimised forwards)."""
    check_callable(cross_attention_class, "forward", ("x", "context", "mask"))


def patch_a1111(classes: Sequence[type], run: GuidanceRun) -> AttributePatch:
    """Checked, unapplied patch of A1111's `CrossAttention.forward` on each class (ldm, sgm)."""
    patch = AttributePatch()
    for cls in classes:
        check_a1111_class(cls)
        patch.add(cls, "forward", make_a1111_forward(cls.forward, run))
    return patch


# -- adapters -------------------------------------------------------------------------------------------

class _ForgeFamilyUNet(HostAdapter):
    family = "unet"
    priority = 50
    unet_module = "backend.nn.unet"
    unet_classes: tuple[str, ...] = ("IntegratedUNet2DConditionModel",)
    attention_name = "attention_function"

    def _module(self) -> ModuleType:
        import importlib
        return importlib.import_module(self.unet_module)

    def _attention_module(self) -> ModuleType:
        return self._module()

    def check(self) -> None:
        check_unet_module(self._attention_module(), self.attention_name)

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        return encode_clip_negatives(p, self.sd_model, negative_prompts)

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        """Forge, Neo and reForge share ComfyUI's sampling hooks (`model_function_wrapper` on the
        pass's cloned UnetPatcher, conditioning modifiers): the negative joins `c_crossattn` after
        the positive's 77*k positions for conditional rows of guided steps."""
        _forge_sampling.attach_forge(p, ctx)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        return patch_unet(self._attention_module(), self.attention_name, run)

    def backend_note(self) -> str | None:
        return _forge_sampling.forge_backend_note() if self.host != "reforge" else None


class NeoUNetAdapter(_ForgeFamilyUNet):
    """Forge Neo SD1.5/SDXL: VSF in every UNet attn2 (`backend/nn/unet.py`)."""

    name = "neo-unet"
    host = "neo"
    label = "Forge Neo SD1.5/SDXL"

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return class_is(diffusion_model(sd_model), cls.unet_module, *cls.unet_classes) and is_forge_neo()


class ForgeUNetAdapter(_ForgeFamilyUNet):
    """Forge SD1.5/SDXL: VSF in every UNet attn2 (`backend/nn/unet.py`)."""

    name = "forge-unet"
    host = "forge"
    label = "Forge SD1.5/SDXL"

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return class_is(diffusion_model(sd_model), cls.unet_module, *cls.unet_classes) and not is_forge_neo()


class ReforgeUNetAdapter(_ForgeFamilyUNet):
    """reForge SD1.5/SDXL: VSF in every UNet attn2 (`ldm_patched/ldm/modules/attention.py`)."""

    name = "reforge-unet"
    host = "reforge"
    label = "reForge SD1.5/SDXL"
    unet_module = "ldm_patched.ldm.modules.diffusionmodules.openaimodel"
    unet_classes = ("UNetModel",)
    attention_name = "optimized_attention"

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return class_is(diffusion_model(sd_model), cls.unet_module, *cls.unet_classes)

    def _attention_module(self) -> ModuleType:
        import importlib
        return importlib.import_module("ldm_patched.ldm.modules.attention")


A1111_UNETS = (("ldm.modules.diffusionmodules.openaimodel", "ldm.modules.attention"),
               ("sgm.modules.diffusionmodules.openaimodel", "sgm.modules.attention"))


class A1111UNetAdapter(HostAdapter):
    """AUTOMATIC1111 SD1.5/SD2/SDXL: VSF in every attn2 (`ldm` / `sgm` `CrossAttention.forward`)."""

    name = "a1111-unet"
    host = "a1111"
    family = "unet"
    label = "A1111 SD1.5/SDXL"
    priority = 50

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        if getattr(sd_model, "forge_objects", None) is not None:
            return False
        model = diffusion_model(sd_model)
        return any(class_is(model, unet_module, "UNetModel") for unet_module, _ in A1111_UNETS)

    def _classes(self) -> list[type]:
        import importlib
        classes: list[type] = []
        for _, attention_module in A1111_UNETS:  # patch both: SDXL refiners / SD1 models may be mixed
            try:
                module = importlib.import_module(attention_module)
            except ImportError:
                continue
            # A1111 aliases ldm's MemoryEfficientCrossAttention to CrossAttention; sgm builds its own
            # (xformers) class for SDXL's "softmax-xformers" blocks when xformers is installed.
            for name in ("CrossAttention", "MemoryEfficientCrossAttention"):
                cls = getattr(module, name, None)
                if isinstance(cls, type) and cls not in classes:
                    classes.append(cls)
        return classes

    def check(self) -> None:
        classes = self._classes()
        if not classes:
            raise PatchError("neither ldm nor sgm CrossAttention is importable (host version not supported)")
        for cls in classes:
            check_a1111_class(cls)
        check_callable(self.sd_model, "apply_model")  # ldm names its first parameter x_noisy, sgm x

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        return encode_clip_negatives(p, self.sd_model, negative_prompts)

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        """A1111 has no model-function wrapper: replace `sd_model.apply_model(x, t, cond)` on the
        instance (undone after sampling) to append the negative to the text context of conditional
        rows — SD1/SD2 `cond["c_crossattn"][0]`, SDXL `cond["crossattn"]`. Uncond rows and the
        single-pass switch (`skip_early_cond`) work as for A1111 SD3 (`a1111_sd3.py`)."""
        from . import a1111_sd3  # lazily: this module must load even if that one does not

        if ctx.single_pass:
            a1111_sd3.A1111SD3Adapter._force_single_pass(self, p, ctx)
        original = self.sd_model.apply_model
        run = ctx.run

        def apply_model(x, t, cond, *args, **kwargs):
            key, context = _a1111_text_context(cond)
            negative = None
            if context is not None and ctx.guided_now():
                is_uncond = (torch.zeros(context.shape[0], dtype=torch.bool) if ctx.single_pass
                             else a1111_sd3.uncond_rows(context, ctx.host_state.get("text_uncond")))
                negative = a1111_sd3.negative_for_rows(ctx, is_uncond)
            if negative is None:
                run.set_text(0, None)
                return original(x, t, cond, *args, **kwargs)
            run.set_text(context.shape[1], negative)
            try:
                extended = append_negative(context, negative)
                cond = {**cond, key: [extended] if key == "c_crossattn" else extended}
                return original(x, t, cond, *args, **kwargs)
            finally:
                run.set_text(0, None)

        patch = AttributePatch().add(self.sd_model, "apply_model", apply_model).apply()
        ctx.add_undo(patch.restore)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        self.check()
        return patch_a1111(self._classes(), run)


def _a1111_text_context(cond: Any) -> tuple[str, torch.Tensor | None]:
    """Where A1111 keeps the text context in `apply_model`'s cond: ("crossattn", tensor) for SDXL,
    ("c_crossattn", first tensor of the list) for SD1/SD2; (key, None) when neither is there."""
    if isinstance(cond, dict):
        if isinstance(cond.get("crossattn"), torch.Tensor):
            return "crossattn", cond["crossattn"]
        listed = cond.get("c_crossattn")
        if isinstance(listed, (list, tuple)) and len(listed) == 1 and isinstance(listed[0], torch.Tensor):
            return "c_crossattn", listed[0]
    return "", None
