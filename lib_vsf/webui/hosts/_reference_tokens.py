"""Where reference-image tokens `R` sit in a joint sequence (Flux Kontext, Qwen-Image-Edit on Forge Neo).

Host-free (no host imports). The registry skips this module (leading underscore).

Neo's Flux and Qwen-Image classes build their image stream inside the model's `forward`: the tokens of
the generated image (`process_img(x)`), then the tokens of every reference latent that the host's
engine left in `backend.args.dynamic_args["ref_latents"]`, appended in order. The attention call then
sees `[text, image, references]` with nothing that tells where the image ends. `ImageStream` wraps the
model's `forward(x, timestep, context, ...)` so that each call records its text length and the number of
tokens of the generated image (from `x`'s spatial size and the patch size, as the host patchifies: the
latent padded up to a multiple of the patch); `reference(length)` then gives the `R` span of a joint
sequence of `length` positions, every position after the image. The record lives in a `ContextVar`, so it
neither leaks across threads nor outlives the call.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StreamCall:
    """What one model call put in front of its attention: `text_len` text tokens, then `image_len` tokens
    of the generated image, then the reference tokens (if any)."""

    text_len: int
    image_len: int


class ImageStream:
    """Records, per model call, how the joint sequence splits into text, image and reference tokens."""

    def __init__(self, patch_size: int):
        self.patch_size = int(patch_size)
        self._call: contextvars.ContextVar[StreamCall | None] = contextvars.ContextVar("vsf_image_stream",
                                                                                        default=None)

    def image_tokens(self, x: Any) -> int:
        """Tokens of the generated image of latent `x` (`[..., H, W]`), padded up to the patch."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        return math.ceil(h / self.patch_size) * math.ceil(w / self.patch_size)

    def wrap_forward(self, original: Callable) -> Callable:
        """`original` (a model's bound `forward(x, timestep, context, ...)`) recording each call."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def forward(*args, **kwargs):
            try:
                arguments = signature.bind(*args, **kwargs).arguments
                call = StreamCall(int(arguments["context"].shape[1]), self.image_tokens(arguments["x"]))
            except (TypeError, KeyError, AttributeError, IndexError):  # an unexpected call: record nothing
                call = None
            token = self._call.set(call)
            try:
                return original(*args, **kwargs)
            finally:
                self._call.reset(token)

        forward.__vsf_original__ = original
        return forward

    def current(self) -> StreamCall | None:
        """The model call running now, or None outside a wrapped `forward`."""
        return self._call.get()

    def reference(self, length: int, text_len: int) -> slice | None:
        """The `R` span of a text-first joint sequence of `length` positions whose text stream has
        `text_len` tokens, in the current call; None when it has no reference tokens, or when no wrapped
        call with that text stream is running."""
        call = self._call.get()
        if call is None or call.text_len != text_len:
            return None
        start = call.text_len + call.image_len
        return slice(start, length) if start < length else None
