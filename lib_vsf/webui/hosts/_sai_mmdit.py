"""The SAI reference MMDiT file, shared by Forge (`backend/nn/mmditx.py`) and AUTOMATIC1111
(`modules/models/sd3/mmdit.py`); the registry skips this module.

Both files compute every attention through a module-level `attention(q, k, v, heads, mask=None)` on
`[B, L, H*D]` tensors, and mix the two streams in a module-level `block_mixing(context, x,
context_block, x_block, c)` that concatenates `[context, x]` (text first) for the joint call. SD3.5
Medium's extra image-only self-attention (`x_block_self_attn`) is a second `attention` call inside the
same `block_mixing`, and plain `DismantledBlock.forward` calls happen outside it. So the patch wraps
`block_mixing` to open a call scope that knows the joint length (`len(context) + len(x)`), and the
`attention` replacement guides only the first call of that scope with exactly that length; every
other call runs the host's own function. The text stream is the tail of `context` (registers, if a
model has any, come first).
"""
from __future__ import annotations

from types import ModuleType

from ...patching import AttributePatch, check_callable
from ...state import GuidanceRun
from ._guided import CallScope, ScopeState, batch_fits, guided_call

BLOCK_SCOPE = CallScope("vsf_sai_mmdit_block_mixing")


def check_mmdit_module(module: ModuleType) -> None:
    """Raise PatchError unless `module` has the SAI `attention` and `block_mixing` functions."""
    check_callable(module, "attention", ("q", "k", "v", "heads", "mask"))
    check_callable(module, "block_mixing", ("context", "x", "context_block", "x_block", "c"))


def patch_mmdit_module(module: ModuleType, run: GuidanceRun) -> AttributePatch:
    """Checked, unapplied patch of `module.attention` and `module.block_mixing` reading `run`."""
    check_mmdit_module(module)
    original_attention = module.attention

    def joint_scope(context, x, *args, **kwargs):
        if context is None or run.negative_len == 0:
            return None
        return ScopeState(expected_len=context.shape[1] + x.shape[1], text_len=context.shape[1], once=True)

    block_mixing = BLOCK_SCOPE.wrap(module.block_mixing, joint_scope)

    def attention(q, k, v, heads, mask=None):
        scope = BLOCK_SCOPE.take()
        if (scope is None or mask is not None or q.shape[1] != scope.expected_len
                or run.negative_len == 0 or not batch_fits(run, q.shape[0])):
            return original_attention(q, k, v, heads, mask)
        text_offset = scope.text_len - run.text_len
        if text_offset < 0:
            raise RuntimeError(f"[VSF] the model's text stream has {scope.text_len} tokens, fewer than the "
                               f"{run.text_len} announced; another extension changed the conditioning")
        return guided_call(q, k, v, heads, run.joint_layout(q.shape[1], text_offset), run, joint=True)

    attention.__vsf_original__ = original_attention
    return AttributePatch().add(module, "attention", attention).add(module, "block_mixing", block_mixing)
