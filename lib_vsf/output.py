"""Writing results: PNGs and GIF/MP4 videos carrying WebUI-style infotext, labelled comparison grids, and
the negative-attention heatmap ("where the negative acts") with its one-line figure."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

INFOTEXT_KEY = "parameters"  # the PNG text chunk the WebUIs read and write


def infotext(prompt: str, negative: str, params: dict[str, object]) -> str:
    """`prompt\\nNegative prompt: ...\\nKey: value, ...`, the WebUIs' generation-parameters text. Like
    the WebUIs, an empty negative prompt leaves out its line."""
    from .settings import _quote  # one quoting rule for every infotext writer

    line = ", ".join(f"{k}: {_quote(str(v))}" for k, v in params.items())
    negative_line = f"Negative prompt: {negative}\n" if negative.strip() else ""
    return f"{prompt}\n{negative_line}{line}"


def save_png(image: Image.Image, path: str | Path, text: str) -> Path:
    """Save `image` as PNG with `text` in the `parameters` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(INFOTEXT_KEY, text)
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_infotext(path: str | Path) -> str:
    with Image.open(path) as img:
        return img.text.get(INFOTEXT_KEY, "") if hasattr(img, "text") else img.info.get(INFOTEXT_KEY, "")


def save_video(frames: Sequence[Image.Image], path: str | Path, text: str, fps: int = 16) -> Path:
    """Save frames as GIF (Pillow, infotext in the comment) or MP4 (needs imageio + ffmpeg)."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        try:
            from diffusers.utils import export_to_video
        except ImportError as err:  # pragma: no cover - diffusers is a dependency of the CLI
            raise RuntimeError("writing MP4 needs diffusers with imageio/ffmpeg; use a .gif path") from err
        export_to_video(list(frames), str(path), fps=fps)
        path.with_suffix(".txt").write_text(text + "\n")
        return path
    frames = list(frames)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps),
                   loop=0, comment=text.encode("utf-8"))
    return path


LABEL_MARGIN = 3  # white pixels at least between a label and its column's edges (and the image below)
MIN_LABEL_PX = 9  # smallest font size used; narrower columns are widened instead of shrinking further
MAX_LABEL_PX = 16


def _label_font(size: int):
    """Pillow's built-in font at `size` px (scalable with FreeType, Pillow >= 10.1), else the fixed
    bitmap font (older Pillow): then there is one size only."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return None


def _text_width(font, text: str) -> float:
    if hasattr(font, "getlength"):
        return font.getlength(text)
    return font.getsize(text)[0]  # Pillow < 8


def _line_height(font) -> int:
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent
    return 11


def _word_gap(font) -> float:
    """Space between words: at small sizes the font's own space is 2 px, too little to read "VSF a=3"."""
    size = getattr(font, "size", 11)
    return max(_text_width(font, " "), 0.4 * size)


def _label_pad(font) -> int:
    """White kept on each side of a label inside its column: twice this separates adjacent labels,
    clearly more than the gap between words of one label."""
    return max(LABEL_MARGIN, round(0.5 * getattr(font, "size", 11)))


def _line_width(font, words: Sequence[str]) -> float:
    return sum(_text_width(font, w) for w in words) + _word_gap(font) * (len(words) - 1)


def wrap_label(label: str, font, width: float) -> list[list[str]]:
    """Greedy word wrap of `label` into lines (lists of words) no wider than `width`; a word wider
    than `width` gets a line of its own (the caller sizes columns so that this does not happen)."""
    lines: list[list[str]] = []
    for word in label.split():
        if lines and _line_width(font, [*lines[-1], word]) <= width:
            lines[-1].append(word)
        else:
            lines.append([word])
    return lines


def _label_layout(labels: Sequence[str], image_width: int, image_height: int):
    """(font, column width) for the caption strip: the largest font from a size that suits the images
    down to MIN_LABEL_PX at which every word of every label fits the column; if none does, the
    smallest font, and the column is widened to the widest word (the image is centred in it)."""
    words = [w for label in labels for w in label.split()] or [""]
    base = max(MIN_LABEL_PX, min(MAX_LABEL_PX, image_height // 6))
    fonts = [f for f in (_label_font(size) for size in range(base, MIN_LABEL_PX - 1, -1)) if f is not None]
    fonts = fonts or [ImageFont.load_default()]
    for font in fonts:
        if max(_text_width(font, w) for w in words) <= image_width - 2 * _label_pad(font):
            return font, image_width
    font = fonts[-1]
    return font, int(math.ceil(max(_text_width(font, w) for w in words))) + 2 * _label_pad(font)


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """One row of images under a caption strip (people judge guidance by looking). Labels are wrapped
    at spaces and drawn inside their own column, with a font that fits the column (see _label_layout),
    so adjacent labels never touch, whatever the image size."""
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    font, column = _label_layout(labels, width, height)
    pad = _label_pad(font)
    wrapped = [wrap_label(label, font, column - 2 * pad) for label in labels]
    line = _line_height(font)
    strip = max(len(lines) for lines in wrapped) * line + 2 * LABEL_MARGIN
    grid = Image.new("RGB", (column * len(images), height + strip), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(zip(images, wrapped)):
        grid.paste(im.convert("RGB"), (i * column + (column - im.width) // 2, strip))
        for j, words in enumerate(lines):
            x = i * column + pad
            for word in words:
                draw.text((x, LABEL_MARGIN + j * line), word, fill="black", font=font)
                x += _text_width(font, word) + _word_gap(font)
    return grid


# ---------------------------------------------------------------------------------------------------------
# Where the negative acts: heatmap of the negative share 1 - W over the image

TINY_SHARE = 0.02  # below this maximum share the negative barely reaches the image
# Colour ramp of the heatmap (share 0 -> dark blue, the map's maximum -> yellow): readable over any image.
_RAMP = ((0.0, (20, 20, 70)), (0.35, (120, 30, 140)), (0.7, (235, 90, 40)), (1.0, (255, 235, 60)))


def negative_share_figure(share) -> str:
    """The one-line figure of a map (a tensor or array of shares in [0, 1]): mean and max negative
    share in percent, and, when the share is tiny, that it is and what to change."""
    mean, peak = float(share.mean()), float(share.max())
    line = f"negative share: mean {100 * mean:.2f}%, max {100 * peak:.2f}%"
    if peak < TINY_SHARE:
        line += " (tiny: the negative barely acts; raise alpha or lower beta)"
    return line


def _heat_colours(values):
    """[h, w] values in [0, 1] -> [h, w, 3] uint8 along _RAMP."""
    import numpy as np

    xs = [x for x, _ in _RAMP]
    channels = [np.interp(values, xs, [c[i] for _, c in _RAMP]) for i in range(3)]
    return np.stack(channels, axis=-1).round().astype("uint8")


MAP_MIN_WIDTH = 256  # a captioned map of a small image is enlarged to this width so the figure reads on one line


def negative_map_image(image: Image.Image, share, caption: bool = True) -> Image.Image:
    """The heatmap of `share` ([h, w] on the latent token grid; [frames, h, w] is averaged over frames)
    blended over `image`, scaled to the map's own maximum, with the one-line figure under it
    (`caption`; small images are then enlarged to MAP_MIN_WIDTH)."""
    import numpy as np

    values = np.asarray(share.float().cpu() if hasattr(share, "cpu") else share, dtype="float64")
    if values.ndim == 3:
        values = values.mean(axis=0)
    peak = float(values.max()) if values.size else 0.0
    scaled = values / peak if peak > 0 else np.zeros_like(values)
    heat = Image.fromarray(_heat_colours(scaled), "RGB").resize(image.size, Image.BILINEAR)
    base = image.convert("L").convert("RGB")
    blended = Image.blend(base, heat, 0.6)
    if not caption:
        return blended
    if blended.width < MAP_MIN_WIDTH:
        factor = MAP_MIN_WIDTH / blended.width
        blended = blended.resize((MAP_MIN_WIDTH, max(1, round(blended.height * factor))), Image.NEAREST)
    return caption_below(blended, negative_share_figure(values))


def caption_below(image: Image.Image, text: str) -> Image.Image:
    """`image` over a white strip with `text` wrapped to its width (the fonts of `labelled_grid`)."""
    font, column = _label_layout([text], image.width, image.height)
    pad = _label_pad(font)
    lines = wrap_label(text, font, column - 2 * pad)
    line = _line_height(font)
    out = Image.new("RGB", (column, image.height + len(lines) * line + 2 * LABEL_MARGIN), "white")
    out.paste(image.convert("RGB"), ((column - image.width) // 2, 0))
    draw = ImageDraw.Draw(out)
    for j, words in enumerate(lines):
        x = pad
        for word in words:
            draw.text((x, image.height + LABEL_MARGIN + j * line), word, fill="black", font=font)
            x += _text_width(font, word) + _word_gap(font)
    return out
