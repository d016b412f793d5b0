"""The negative prompt through the host's own text engines, cut to its real tokens (A1111, Forge,
Forge Neo, reForge adapters all use it).

Host-free at import (host modules are imported inside functions); the adapter registry skips this module.

The host's own `get_learned_conditioning` (emphasis, textual inversion, clip skip as the user set them)
runs on one prompt at a time, then the result is cut to the real tokens: each CLIP chunk up to its first
EOS (BOS + tokens + EOS; CLIP is causal, so those positions equal an unpadded encoding), the T5 part up to
its EOS (tokens + EOS), and nothing of a zero-filled T5 slot (SD3 with T5 off).
Flux's lambda (paper eq. 10) extrapolates against `p0` as `lib_vsf.flux_lambda` defines it: the empty
prompt encoded by the host's own T5 engine, so it exists even when the negative fills its T5 chunk.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ...flux_lambda import extrapolate_negative, null_embedding
from ...settings import VSFSettings
from ...state import NegativeText
from .base import real_length

CLIP_CHUNK = 77
FLUX_T5_LENGTH = 256  # Forge's and Neo's Flux T5 engines pad every prompt to at least this many tokens


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


def encode_with_engine(sd_model: Any, engine: Any, prompts: Sequence[str]) -> NegativeText:
    """Each negative through a Forge-family text engine that pads nothing (Neo's Qwen3 and Qwen2.5-VL
    engines): `engine([prompt])[0]` is that prompt's own conditioning, as its negative pass sees it. The
    text encoder is loaded onto the device first, as the host's own conditioning call does."""
    try:
        from backend import memory_management  # type: ignore[import-not-found]

        memory_management.load_model_gpu(sd_model.forge_objects.clip.patcher)
    except (ImportError, AttributeError):
        pass

    def encode(prompt: str) -> torch.Tensor:
        with torch.inference_mode():
            return engine([prompt])[0].clone()

    return encode_each(list(prompts), encode)


def t5_null_embedding(engine: Any) -> torch.Tensor:
    """`p0` of paper eq. 10 (`lib_vsf.flux_lambda.null_embedding`) through a Forge / Neo T5 text engine:
    the empty prompt padded to the engine's own prompt length (`min_length`; engines that pad nothing,
    Chroma's, use Flux's 256), encoded by the engine's `process_tokens` like any prompt chunk."""
    length = engine.min_length if engine.min_length >= 2 else FLUX_T5_LENGTH

    def encode(ids: torch.Tensor) -> torch.Tensor:
        tokens = ids.tolist()
        return engine.process_tokens(tokens, [[1.0] * len(row) for row in tokens])

    return null_embedding(encode, engine.id_end, engine.id_pad, length)


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
