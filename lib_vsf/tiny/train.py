"""Deterministic training of the bundled tiny model: `python -m lib_vsf train-tiny`.

Rectified flow (flow matching) in pixel space: x_t = (1 - t) x_0 + t noise, the transformer predicts
noise - x_0 at timestep 1000 t, t logit-normal (mean 0, std 1), as FlowMatchEulerDiscreteScheduler
samples it back. The text encoders train with the transformer; 10% of captions are dropped to "" (the
pipeline's unconditional prompt, so CFG can be compared). Every batch, noise and t of step i come from
seeds derived from (seed, i), so a run is reproducible bit for bit on the same machine and thread count.
The pipeline's 256 zero T5 tokens are trained as one token with + log 256 on its attention logit
(`model.CollapsedZerosProcessor`, the same function); the saved pipeline uses the standard processors.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from . import data, model

DEFAULTS = dict(steps=1200, batch=32, lr=1e-3, warmup=100, caption_dropout=0.1, seed=0, stop_after=1200)


def encode(pipe, captions):
    """Prompt embeddings as the pipeline makes them, with the zero T5 tail as one token."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=captions, prompt_3=captions, device="cpu",
                                              do_classifier_free_guidance=False, max_sequence_length=1)
    return embeds, pooled


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(steps: int = DEFAULTS["steps"], batch: int = DEFAULTS["batch"], lr: float = DEFAULTS["lr"],
          warmup: int = DEFAULTS["warmup"], caption_dropout: float = DEFAULTS["caption_dropout"],
          seed: int = DEFAULTS["seed"], out: str | Path | None = None, log_every: int = 50, log=print,
          stop_after: int | None = None):
    """Train from scratch; returns (pipeline, per-step losses). Writes the pipeline to `out` if given.
    `stop_after`: end after that many steps of the `steps`-step schedule (the bundled weights are
    DEFAULTS["stop_after"] steps of the default schedule)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    pipe = model.build_pipeline(seed)
    pipe.transformer.set_attn_processor(model.CollapsedZerosProcessor())
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]  # not the zero projections
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    losses, start = [], time.time()
    for step in range(steps if stop_after is None else min(stop_after, steps)):
        rng = np.random.default_rng([seed, step])
        images, captions, _, _ = data.batch(rng, batch)
        captions = ["" if rng.random() < caption_dropout else c for c in captions]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x0 = torch.from_numpy(images)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(batch, generator=gen))
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        embeds, pooled = encode(pipe, captions)
        pred = pipe.transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=embeds,
                                pooled_projections=pooled).sample
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log and log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            log(f"step {step + 1}/{steps} loss {recent:.4f} ({time.time() - start:.0f} s)")
    for m in modules:
        m.eval()
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
    if out is not None:
        save(pipe, out)
    return pipe, losses


def save(pipe, out: str | Path) -> Path:
    """The pipeline as safetensors; the transformer and text encoders in float16 (about half the size)."""
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).to(torch.float16).save_pretrained(out / name, safe_serialization=True)
        getattr(pipe, name).to(torch.float32)
    return out
