"""Reference-image tokens `R` and a negative image in a joint sequence (Flux Kontext, Qwen-Image-Edit on
Forge Neo).

Host-free (no host imports). The registry skips this module (leading underscore).

Neo's Flux and Qwen-Image classes build their image stream inside the model's `forward`: the tokens of
the generated image (`process_img(x)`), then the tokens of every reference latent that the host's
engine left in `backend.args.dynamic_args["ref_latents"]`, appended in order; the output rows after the
generated image are dropped. The attention call then sees `[text, image, references]` with nothing that
tells where the image ends. `ImageStream` wraps the model's `forward(x, timestep, context, ...)` so that
each call records its text length and the number of tokens of the generated image (from `x`'s spatial
size and the patch size, as the host patchifies: the latent padded up to a multiple of the patch);
`reference(length, text_len)` then gives the `R` span of a joint sequence of `length` positions. The
record lives in a `ContextVar`, so it neither leaks across threads nor outlives the call.

A negative image (docs/negative-images.md) rides on the same mechanism: encoded once per generation as
the host encodes a reference image (`ReferenceLatent`), it is appended by the wrapped `forward` as the
*last* entry of `dynamic_args["ref_latents"]` for the model calls the runner marked with its tokens
(`GuidanceRun.set_text(..., negative_image_len=)`), and put back in a `finally`. So Neo itself gives its
tokens the positions of the next reference, runs them through the image-side weights and drops their
output rows. The joint sequence is then `[P, N_txt, I, R, N_img]`; `guided_joint_call` moves the last
`N_img` positions to just after the text, `[P, N_txt | N_img, I, R]` (the layout `GuidanceRun` describes,
one N span), runs the guided attention, and moves the output rows back.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, MutableMapping

import torch

from ...state import GuidanceRun
from ._guided import guided_call

REF_LATENTS = "ref_latents"  # the key of Neo's `backend.args.dynamic_args` its models read


@dataclass(frozen=True)
class StreamCall:
    """What one model call put in front of its attention: `text_len` text tokens, then `image_len` tokens
    of the generated image, then the reference tokens (if any), then `negative_image_len` tokens of a
    negative image (if this call carries one)."""

    text_len: int
    image_len: int
    negative_image_len: int = 0


@dataclass(frozen=True)
class ReferenceLatent:
    """A negative image as the host's engine would leave it in `ref_latents` (`latent`), and the number
    of image-stream tokens the model makes of it (`length`)."""

    latent: torch.Tensor
    length: int


def latent_tokens(latent: Any, patch_size: int) -> int:
    """Tokens of a latent `[..., H, W]` once patchified (the host pads up to a multiple of the patch)."""
    h, w = int(latent.shape[-2]), int(latent.shape[-1])
    return math.ceil(h / patch_size) * math.ceil(w / patch_size)


def reference_pixels(image: Any, width: int, height: int) -> torch.Tensor:
    """A PIL image as Neo's engines take a reference image before the VAE: resized to the generation's
    `width` x `height` (as img2img resizes its input image, "Just resize", Lanczos), RGB, float32 in
    [0, 1], `[1, height, width, 3]` (what `encode_first_stage` hands the VAE: `x.movedim(1, -1) * 0.5 + 0.5`)."""
    import numpy as np
    from PIL import Image

    rgb = image.convert("RGB")
    if rgb.size != (int(width), int(height)):
        rgb = rgb.resize((int(width), int(height)), resample=Image.LANCZOS)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None]


class ImageStream:
    """Records, per model call, how the joint sequence splits into text, image and reference tokens; with
    `run` and the host's `dynamic_args`, also adds the run's negative image to the calls marked for it."""

    def __init__(self, patch_size: int, run: GuidanceRun | None = None,
                 dynamic_args: MutableMapping[str, Any] | None = None):
        self.patch_size = int(patch_size)
        self.run = run
        self.dynamic_args = dynamic_args
        self._call: contextvars.ContextVar[StreamCall | None] = contextvars.ContextVar("vsf_image_stream",
                                                                                        default=None)

    def image_tokens(self, x: Any) -> int:
        """Tokens of the generated image of latent `x` (`[..., H, W]`), padded up to the patch."""
        return latent_tokens(x, self.patch_size)

    def _negative_image(self, text_len: int) -> ReferenceLatent | None:
        """The negative image this call is to carry: the run marked the call (its text stream is the one
        the runner announced, with the image's tokens) and the host's references can take one more."""
        run = self.run
        image = None if run is None else run.negative_image
        if (image is None or self.dynamic_args is None or run.negative_image_len != image.length
                or run.text_len != text_len):
            return None
        return image

    def wrap_forward(self, original: Callable) -> Callable:
        """`original` (a model's bound `forward(x, timestep, context, ...)`) recording each call and
        appending the negative image to the host's references for the calls that carry it."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def forward(*args, **kwargs):
            try:
                arguments = signature.bind(*args, **kwargs).arguments
                text_len, image_len = int(arguments["context"].shape[1]), self.image_tokens(arguments["x"])
            except (TypeError, KeyError, AttributeError, IndexError):  # an unexpected call: record nothing
                token = self._call.set(None)
                try:
                    return original(*args, **kwargs)
                finally:
                    self._call.reset(token)
            negative = self._negative_image(text_len)
            token = self._call.set(StreamCall(text_len, image_len, 0 if negative is None else negative.length))
            if negative is None:
                try:
                    return original(*args, **kwargs)
                finally:
                    self._call.reset(token)
            dynamic_args = self.dynamic_args
            had, references = REF_LATENTS in dynamic_args, dynamic_args.get(REF_LATENTS)
            dynamic_args[REF_LATENTS] = [*(references or []), negative.latent]  # a new list: the host's stays
            try:
                return original(*args, **kwargs)
            finally:
                if had:
                    dynamic_args[REF_LATENTS] = references
                else:
                    dynamic_args.pop(REF_LATENTS, None)
                self._call.reset(token)

        forward.__vsf_original__ = original
        return forward

    def current(self) -> StreamCall | None:
        """The model call running now, or None outside a wrapped `forward`."""
        return self._call.get()

    def negative_image_len(self, length: int, text_len: int) -> int:
        """Negative-image tokens at the end of a joint sequence of `length` positions (0 when the current
        call carries none or does not have that text stream)."""
        call = self._call.get()
        if call is None or call.text_len != text_len or call.negative_image_len >= length - text_len:
            return 0
        return call.negative_image_len

    def reference(self, length: int, text_len: int) -> slice | None:
        """The `R` span of a text-first joint sequence of `length` positions whose text stream has
        `text_len` tokens, in the current call, as `guided_joint_call` orders it (a negative image just
        after the text); None when it has no reference tokens, or when no wrapped call with that text
        stream is running."""
        call = self._call.get()
        if call is None or call.text_len != text_len:
            return None
        start = call.text_len + self.negative_image_len(length, text_len) + call.image_len
        return slice(start, length) if start < length else None


def _move(t: torch.Tensor, dim: int, start: int, count: int, to_front: bool) -> torch.Tensor:
    """`t` with the last `count` positions of `dim` moved to `start` (`to_front`), or back."""
    if to_front:
        head, tail, moved = t.narrow(dim, 0, start), t.narrow(dim, start, t.shape[dim] - start - count), \
            t.narrow(dim, t.shape[dim] - count, count)
        return torch.cat([head, moved, tail], dim=dim)
    head, moved, tail = t.narrow(dim, 0, start), t.narrow(dim, start, count), \
        t.narrow(dim, start + count, t.shape[dim] - start - count)
    return torch.cat([head, tail, moved], dim=dim)


def guided_joint_call(stream: ImageStream, run: GuidanceRun, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      heads: int, *, skip_reshape: bool = False, skip_output_reshape: bool = False) -> torch.Tensor:
    """The guided call of a text-first joint sequence `[P, N_txt, I, R(, N_img)]` in the host's calling
    convention (`_guided.guided_call`): with a negative image, its rows are moved to just after the text
    for the call (`[P, N_txt | N_img, I, R]`) and the output's rows back where the host has them."""
    seq_dim = 2 if skip_reshape else 1
    length = q.shape[seq_dim]
    count = stream.negative_image_len(length, run.text_len)
    if count:
        q, k, v = (_move(t, seq_dim, run.text_len, count, True) for t in (q, k, v))
    layout = run.joint_layout(length, text_offset=0, reference=stream.reference(length, run.text_len))
    out = guided_call(q, k, v, heads, layout, run, joint=True, skip_reshape=skip_reshape,
                      skip_output_reshape=skip_output_reshape)
    if count:
        out = _move(out, 2 if skip_output_reshape else 1, run.text_len, count, False)
    return out
