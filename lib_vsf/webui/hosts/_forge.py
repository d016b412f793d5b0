"""Forge-family sampling glue shared by the Forge adapters: negative encoding and the per-pass hook.

Host-free at import (Forge modules are imported inside functions); the registry skips this module.

How the negative reaches the model in Forge (`backend/sampling/sampling_function.py`): every model call
goes through `model_options["model_function_wrapper"](apply_model, {"input", "timestep", "c",
"cond_or_uncond"})` when one is set. `attach_forge()` clones the pass's `UnetPatcher` (Forge rebuilds
`forge_objects` from `forge_objects_after_applying_lora` before every pass, so the clone dies with the
pass and LoRA patches carry over), installs a wrapper that appends the negative tokens to
`c["c_crossattn"]` for COND chunks of guided steps (UNCOND chunks get masked-out rows) and records the
text stream in the `GuidanceRun`, chaining any wrapper another extension set before. One conditional
pass: a conditioning modifier returns `cond_scale = 1` and no uncond (Forge itself drops uncond at
`cond_scale == 1`; `p.uc` is None at CFG 1, which is why the negative is encoded here, not taken from
the host's uncond).

Negative encoding: the host's own `get_learned_conditioning` (emphasis, textual inversion, clip skip
as the user set them) on one prompt at a time, then cut to the real tokens: each CLIP chunk up to its
first EOS (BOS + tokens + EOS; CLIP is causal, so those positions equal an unpadded encoding), the T5
part up to its EOS (tokens + EOS), and nothing of a zero-filled T5 slot (SD3 with T5 off).
Flux's lambda (paper eq. 10) extrapolates against `p0` as `lib_vsf.flux_lambda` defines it: the empty
prompt encoded by the host's own T5 engine, so it exists even when the negative fills its T5 chunk.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ...flux_lambda import extrapolate_negative, null_embedding
from ...state import NegativeText
from ...settings import VSFSettings
from ._guided import warn_once
from .base import COND, SamplingContext, append_negative, real_length

CLIP_CHUNK = 77
FLUX_T5_LENGTH = 256  # Forge's and Neo's Flux T5 engines pad every prompt to at least this many tokens


def is_forge() -> bool:
    """The running host has Forge's backend (Forge, or a Forge fork)."""
    try:
        import backend.sampling.sampling_function  # type: ignore[import-not-found] # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _conditioning_prompts(p: Any, prompts: Sequence[str]):
    """Forge/A1111's `SdConditioning` for a negative prompt list (falls back to a plain list)."""
    try:
        from modules import prompt_parser  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - host doubles
        return list(prompts)
    return prompt_parser.SdConditioning(list(prompts), is_negative_prompt=True,
                                        width=getattr(p, "width", None), height=getattr(p, "height", None))


def host_encode(p: Any, sd_model: Any, prompt: str) -> dict:
    """The host's padded conditioning for one negative prompt, as a dict with `crossattn` [1, L, E]."""
    cond = sd_model.get_learned_conditioning(_conditioning_prompts(p, [prompt]))
    if isinstance(cond, torch.Tensor):
        cond = {"crossattn": cond}
    return cond


def clip_chunk_lengths(engine: Any, prompt: str) -> list[int]:
    """Real positions (BOS + tokens + EOS) of each 77-token chunk a CLIP text engine makes of `prompt`."""
    chunks, _ = engine.tokenize_line(prompt)
    return [real_length(list(chunk.tokens), engine.id_end, has_start=True) for chunk in chunks]


def t5_length(engine: Any, prompt: str) -> int:
    """Real positions (tokens + EOS) of the first T5 chunk of `prompt`."""
    chunks, _ = engine.tokenize_line(prompt)
    if not chunks:
        return 0
    return real_length(list(chunks[0].tokens), engine.id_end, has_start=False)


def unpad_clip_t5(crossattn: torch.Tensor, clip_lengths: Sequence[int], t5_len: int,
                  chunk: int = CLIP_CHUNK) -> torch.Tensor:
    """`[n, E]`: the real CLIP positions of each chunk, then the first `t5_len` T5 positions, from a
    padded `[1, chunks*77 + T5, E]` SD3 encoding. An empty CLIP prompt (no chunk tokens) with no T5
    tokens gives `[0, E]`."""
    row = crossattn[0]
    parts = [row[i * chunk: i * chunk + n] for i, n in enumerate(clip_lengths) if n > 0]
    t5_start = len(clip_lengths) * chunk
    if t5_len > 0:
        parts.append(row[t5_start: t5_start + t5_len])
    if not parts:
        return row[:0]
    return torch.cat(parts, dim=0)


def encode_each(prompts: Sequence[str], encode_one: Callable[[str], torch.Tensor]) -> NegativeText:
    """NegativeText from per-prompt `[n_i, E]` encodings; identical prompts are encoded once and an
    empty prompt gives no tokens."""
    cache: dict[str, torch.Tensor] = {}
    rows = []
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = encode_one(prompt) if prompt.strip() else None
        rows.append(cache[prompt])
    width_ref = next((r for r in rows if r is not None), None)
    if width_ref is None:
        return NegativeText(torch.zeros(len(prompts), 0, 1), torch.zeros(len(prompts), 0, dtype=torch.bool))
    rows = [r if r is not None else width_ref[:0] for r in rows]
    return NegativeText.from_sequences([r.detach().clone() for r in rows])


def t5_null_embedding(engine: Any) -> torch.Tensor:
    """`p0` of paper eq. 10 (`lib_vsf.flux_lambda.null_embedding`) through a Forge / Neo T5 text engine:
    the empty prompt padded to the engine's own prompt length (`min_length`; engines that pad nothing,
    Chroma's, use Flux's 256), encoded by the engine's `process_tokens` like any prompt chunk."""
    length = engine.min_length if engine.min_length >= 2 else FLUX_T5_LENGTH

    def encode(ids: torch.Tensor) -> torch.Tensor:
        tokens = ids.tolist()
        return engine.process_tokens(tokens, [[1.0] * len(row) for row in tokens])

    return null_embedding(encode, engine.id_end, engine.id_pad, length)


def attach_forge(p: Any, ctx: SamplingContext) -> None:
    """Install the per-pass model wrapper (negative into `c_crossattn`) and, if asked, one
    conditional pass, on a clone of the pass's UnetPatcher (see the module docstring)."""
    unet = p.sd_model.forge_objects.unet.clone()
    previous = unet.model_options.get("model_function_wrapper")
    run = ctx.run

    def vsf_model_function_wrapper(apply_model, args):
        c = dict(args["c"])
        kinds = list(args.get("cond_or_uncond") or [])
        context = c.get("c_crossattn")
        negative = None
        if isinstance(context, torch.Tensor) and ctx.guided_now() and (not kinds or COND in kinds):
            try:
                negative = ctx.negative_for_chunks(kinds, context.shape[0])
            except ValueError as exc:  # rows that do not map onto the batch's images: run this call plain
                warn_once("forge-rows", f"model call without VSF: {exc}")
        if negative is not None:
            c["c_crossattn"] = append_negative(context, negative)
            run.set_text(context.shape[1], negative)
        else:
            run.set_text(0, None)
        try:
            if previous is not None:
                return previous(apply_model, {**args, "c": c})
            return apply_model(args["input"], args["timestep"], **c)
        finally:
            run.set_text(0, None)

    unet.set_model_unet_function_wrapper(vsf_model_function_wrapper)
    if ctx.single_pass:
        def vsf_single_pass(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            return model, x, timestep, None, cond, 1.0, model_options, seed

        unet.add_conditioning_modifier(vsf_single_pass)
    p.sd_model.forge_objects.unet = unet


def forge_backend_note() -> str | None:
    """Forge's attention setting: only the PyTorch path can carry VSF's mask."""
    try:
        from backend import attention  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        return None
    if getattr(attention, "attention_function", None) is getattr(attention, "attention_pytorch", object()):
        return None
    name = getattr(getattr(attention, "attention_function", None), "__name__", "unknown")
    return (f"VSF computes its guided attention calls with PyTorch SDPA: your attention backend ({name}) "
            "cannot take the mask VSF needs; it still runs every unguided call.")


def encode_flux_negatives(p: Any, sd_model: Any, prompts: Sequence[str], settings: VSFSettings) -> NegativeText:
    """Flux / Chroma negatives through the host's T5 engine (Forge and Forge Neo): T5 tokens + EOS of
    each prompt, lambda-extrapolated (paper eq. 10) against the engine's null embedding (computed once
    per call, after the first negative: the host's encode loads the text encoder and sets its emphasis)."""
    engine = sd_model.text_processing_engine_t5
    null: list[torch.Tensor] = []

    def encode(prompt: str):
        cond = host_encode(p, sd_model, prompt)
        negative = cond["crossattn"][0, :t5_length(engine, prompt)]
        if not settings.flux_lambda:
            return negative
        if not null:
            null.append(t5_null_embedding(engine))
        return extrapolate_negative(negative, null[0], settings.flux_lambda)

    return encode_each(prompts, encode)
