""""Show where the negative acts" in the WebUI: the map image of one output and its note line.

Host-free. The runner records the negative share (1 - W, `lib_vsf.state.NegativeShareMap`) of each
sampling pass only when the option is on; after the pass that made an image (the hires pass when
there is one), `map_for_output` turns that image's row of the map into

- one labelled image: the heatmap over the image (`lib_vsf.output.negative_map_image`) with the
  line "Where the negative acts: negative share: mean X%, max Y%" under it;
- the note line "Negative share: mean X%, max Y%", with the advice to raise alpha or lower beta when
  the maximum share is under `lib_vsf.output.TINY_SHARE` (2%): the core's threshold, so the CLI, the
  diffusers integration and the WebUI call the same map tiny.

The hosts do not say where the image tokens of their models sit, so the grid is found from the map
itself and the image's size (`grid_for`): a model's finest attention level holds one token per
8x8 (UNet), 16x16 (SD3, Flux, Z-Image, Flux.2, Wan) or 32x32 pixels, rounded up, and a video model
`frames` times as many.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..state import LatentGrid, NegativeShareMap

MAP_TITLE = "Where the negative acts"
PIXELS_PER_TOKEN = (8, 16, 32)  # finest attention level of UNets; DiTs (VAE /8, 2x2 patches); /32 VAEs
NO_MAP = "VSF: no negative-attention map for this image: {reason}."


@dataclass
class OutputMap:
    """One output's map: the labelled image and the note line."""

    image: Any  # PIL image
    note: str


def grid_for(tokens: int, width: int, height: int) -> LatentGrid | None:
    """The token grid of an image `width` x `height` pixels whose finest attention level holds `tokens`
    image tokens (frame-major for video), or None when no known patch size fits."""
    for pixels in PIXELS_PER_TOKEN:
        h, w = -(-int(height) // pixels), -(-int(width) // pixels)
        if h * w == tokens:
            return LatentGrid(1, h, w)
    for pixels in PIXELS_PER_TOKEN:
        h, w = -(-int(height) // pixels), -(-int(width) // pixels)
        if h * w and tokens % (h * w) == 0 and tokens // (h * w) > 1:
            return LatentGrid(tokens // (h * w), h, w, video=True)
    return None


def share_line(share: Any) -> str:
    """"Negative share: mean X%, max Y%" (+ the tiny-share advice), from the core's figure."""
    from ..output import negative_share_figure

    figure = negative_share_figure(share)
    return figure[:1].upper() + figure[1:]


def map_for_output(recorder: NegativeShareMap, image: Any, row: int) -> OutputMap | str | None:
    """The map of batch row `row` over `image` (the output as the host made it), or the reason there is
    none (a sentence for the note). A video's frames arrive as outputs one by one: its map (the mean over
    its frames) goes with the first frame, the others get None (no map, nothing to say)."""
    from ..output import MAP_MIN_WIDTH, caption_below, negative_map_image

    if recorder.undefined_reason is not None:
        return recorder.undefined_reason
    recorder.grid = None
    flat = recorder.mean()  # without a grid: the finest level, [B, tokens]
    if flat is None:
        return "no attention call was guided"
    tokens = flat.shape[-1]
    recorder.grid = grid_for(tokens, *image.size)
    if recorder.grid is None:
        return f"its {tokens} image tokens do not form a grid for a {image.width}x{image.height} image"
    share = recorder.mean()
    if share is None or share.dim() < 3:
        return "the guided steps recorded maps of different sizes"
    if not 0 <= row < share.shape[0]:
        if recorder.grid.video:
            return None
        return f"the map has {share.shape[0]} rows, this is image {row + 1} of its batch"
    one = share[row]
    line = share_line(one)
    picture = negative_map_image(image.convert("RGB"), one, caption=False)
    if picture.width < MAP_MIN_WIDTH:  # so that the label reads on one or two lines
        picture = picture.resize((MAP_MIN_WIDTH, max(1, round(picture.height * MAP_MIN_WIDTH / picture.width))))
    return OutputMap(caption_below(picture, f"{MAP_TITLE}: {line[:1].lower()}{line[1:]}"), line)
