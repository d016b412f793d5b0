"""reForge: SD3 / SD3.5 (Medium, Large, Turbo) joint attention through its ComfyUI MMDiT port.

reForge's `ldm_patched/ldm/modules/diffusionmodules/mmdit.py` mixes the streams in the module-level
function `_block_mixing(context, x, context_block, x_block, c)`: it concatenates `[context, x]` (text
first), calls the module's own binding of `optimized_attention(q, k, v, heads=...)` (`[B, L, H*D]`, no
mask, no options), and for SD3.5 Medium's extra x-block self-attention calls it a second time over
the image tokens only. The same name is also used by image-only and context-only attention elsewhere
in the file.

The patch replaces `mmdit.optimized_attention` and wraps `_block_mixing` so that it opens a call scope
(see `_guided.py`) carrying the expected joint length `len(context) + len(x)`: only the first
attention call inside the scope, with that length and with the context being the announced text
stream `[P, N]`, is guided. Image-only attention always runs unchanged (VSF-SPEC).
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

import torch

from ...patching import AttributePatch, check_callable
from ...settings import VSFSettings
from ...state import GuidanceRun, NegativeText
from . import _forge_sampling, _negative_text
from ._guided import (CallScope, ScopeState, batch_fits, check_attention_function, class_is, diffusion_model,
                      guided_call, split_mask_arg)
from .base import HostAdapter, SamplingContext, real_length

MMDIT_MODULE = "ldm_patched.ldm.modules.diffusionmodules.mmdit"

MIXING_SCOPE = CallScope("vsf_reforge_block_mixing")


CLIP_END, T5_END = 49407, 1  # end-of-text ids of CLIP-L/G and T5 (ComfyUI tokenizers)


def _token_ids(chunk: Sequence[Any]) -> list[int]:
    """Token ids of one ComfyUI tokenizer chunk of `(token, weight[, word_id])` tuples; textual-inversion
    embeddings (tensors in place of ids) count as ordinary tokens (-1)."""
    return [t[0] if isinstance(t[0], int) else -1 for t in chunk]


def sd3_negative(cond: torch.Tensor, tokens: dict, chunk: int = _negative_text.CLIP_CHUNK) -> torch.Tensor:
    """`[n, E]` unpadded SD3 negative from ComfyUI's `[1, 77k (+ T5), 4096]` encoding of one prompt and
    its `clip.tokenize()` dict (`"l"`, `"g"`, `"t5xxl"` chunk lists): each CLIP chunk up to its EOS,
    then T5 tokens + EOS when the encoding carries a T5 part (T5 loaded)."""
    clip_chunks = tokens.get("l") or tokens.get("g") or []
    keep = [real_length(_token_ids(c), CLIP_END, has_start=True) for c in clip_chunks]
    t5 = 0
    if tokens.get("t5xxl") and cond.shape[1] > len(clip_chunks) * chunk:
        t5 = real_length(_token_ids(tokens["t5xxl"][0]), T5_END, has_start=False)
    return _negative_text.unpad_clip_t5(cond, keep, t5, chunk=chunk)


def check_mmdit_module(mmdit: ModuleType) -> None:
    """Raise PatchError unless `mmdit` has `optimized_attention(q, k, v, heads, ...)` and
    `_block_mixing(context, x, context_block, x_block, c)`."""
    check_attention_function(mmdit, "optimized_attention", ("heads", "mask"))
    check_callable(mmdit, "_block_mixing", ("context", "x", "context_block", "x_block", "c"))


def _mixing_scope(*args, **kwargs) -> ScopeState:
    context = kwargs["context"] if "context" in kwargs else args[0]
    x = kwargs["x"] if "x" in kwargs else args[1]
    return ScopeState(expected_len=context.shape[1] + x.shape[1], text_len=context.shape[1], once=True)


def make_mmdit_attention(original, run: GuidanceRun):
    """Replacement for `mmdit.optimized_attention`: guided for the joint call of `_block_mixing`."""

    def mmdit_optimized_attention(q, k, v, heads, *args, **kwargs):
        scope = MIXING_SCOPE.take()
        skip_reshape = kwargs.get("skip_reshape", False)
        length = q.shape[2] if skip_reshape else q.shape[1]
        if (scope is None or run.negative_len == 0 or length != scope.expected_len
                or scope.text_len != run.text_len or split_mask_arg(args, kwargs) is not None
                or not batch_fits(run, q.shape[0])):
            return original(q, k, v, heads, *args, **kwargs)
        layout = run.joint_layout(length, text_offset=0)  # context first
        return guided_call(q, k, v, heads, layout, run, joint=True, skip_reshape=skip_reshape,
                           skip_output_reshape=kwargs.get("skip_output_reshape", False))

    mmdit_optimized_attention.__vsf_original__ = original
    return mmdit_optimized_attention


def patch_mmdit(mmdit: ModuleType, run: GuidanceRun) -> AttributePatch:
    """Checked, unapplied patch of reForge's MMDiT file (PatchError if the host differs)."""
    check_mmdit_module(mmdit)
    return (AttributePatch()
            .add(mmdit, "optimized_attention", make_mmdit_attention(mmdit.optimized_attention, run))
            .add(mmdit, "_block_mixing", MIXING_SCOPE.wrap(mmdit._block_mixing, _mixing_scope)))


class ReforgeMMDiTAdapter(HostAdapter):
    """reForge SD3/SD3.5: VSF in every joint attention, context first."""

    name = "reforge-sd3"
    host = "reforge"
    family = "sd3"
    label = "reForge SD3/SD3.5"
    priority = 20

    @classmethod
    def matches(cls, sd_model: Any) -> bool:
        return class_is(diffusion_model(sd_model), MMDIT_MODULE, "OpenAISignatureMMDITWrapper", "MMDiT")

    def _module(self) -> ModuleType:
        from ldm_patched.ldm.modules.diffusionmodules import mmdit  # type: ignore[import-not-found]
        return mmdit

    def check(self) -> None:
        check_mmdit_module(self._module())

    def encode_negative(self, p: Any, negative_prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
        """Through the model's ComfyUI CLIP object (`forge_objects.clip`): reForge's SD3 model object has
        no A1111 `get_learned_conditioning`. Not verified against a running reForge server."""
        clip = self.sd_model.forge_objects.clip

        def encode(prompt: str) -> torch.Tensor:
            tokens = clip.tokenize(prompt)
            cond, _ = clip.encode_from_tokens(tokens, return_pooled=True)
            return sd3_negative(cond, tokens)

        return _negative_text.encode_each(negative_prompts, encode)

    def attach(self, p: Any, ctx: SamplingContext) -> None:
        """reForge keeps Forge's sampling hooks on `forge_objects.unet` (model_function_wrapper and
        conditioning modifiers, `modules_forge/forge_sampler.py`)."""
        _forge_sampling.attach_forge(p, ctx)

    def patch(self, run: GuidanceRun) -> AttributePatch:
        return patch_mmdit(self._module(), run)
