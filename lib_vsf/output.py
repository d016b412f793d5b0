"""Writing results: PNGs and GIF/MP4 videos carrying WebUI-style infotext, and labelled comparison grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

INFOTEXT_KEY = "parameters"  # the PNG text chunk the WebUIs read and write


def infotext(prompt: str, negative: str, params: dict[str, object]) -> str:
    """`prompt\\nNegative prompt: ...\\nKey: value, ...`, the WebUIs' generation-parameters text."""
    from .settings import _quote  # one quoting rule for every infotext writer

    line = ", ".join(f"{k}: {_quote(str(v))}" for k, v in params.items())
    return f"{prompt}\nNegative prompt: {negative}\n{line}"


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


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """One row of images with a caption strip above each (people judge guidance by looking)."""
    font = ImageFont.load_default()
    width = max(im.width for im in images)
    height = max(im.height for im in images)
    strip = 14 if height < 128 else 24
    grid = Image.new("RGB", (width * len(images), height + strip), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, label) in enumerate(zip(images, labels)):
        grid.paste(im.convert("RGB"), (i * width, strip))
        draw.text((i * width + 2, 1), label, fill="black", font=font)
    return grid
