"""`python -m lib_vsf generate` on tiny pipelines saved to a temp dir; metadata round trips; grid labels."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFont

from lib_vsf import VSFSettings, VSFSettingsError, from_preset
from lib_vsf.cli import main
from lib_vsf.output import labelled_grid, read_png_infotext, wrap_label
from lib_vsf.settings import parse_infotext
from tiny_pipelines import BUILDERS

SMALL = ["--steps", "2", "--width", "16", "--height", "16", "--max-sequence-length", "16"]
COMPARE_LABELS = ["unguided", "VSF a=3.5 b=0.1", "NAG a=4 b=0.125", "NASA a=0.15 b=0"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    paths = {}
    for name in ("sd3", "wan"):
        BUILDERS[name]().save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def sized(size):
    return ["--steps", "2", "--width", str(size), "--height", str(size), "--max-sequence-length", "16"]


def grid_cells(grid: Image.Image, columns: int, image_size: int):
    """(caption strip [H, W], column width, images): the grid is one caption strip above one row of
    equal columns, each image centred in its column."""
    pixels = np.asarray(grid.convert("RGB"))
    strip = grid.height - image_size
    column = grid.width // columns
    assert strip > 0 and column * columns == grid.width and column >= image_size
    left = (column - image_size) // 2
    images = [pixels[strip:, i * column + left:i * column + left + image_size] for i in range(columns)]
    return pixels[:strip], column, images


def ink_runs(flags):
    """[start, stop) runs of True in a 1-D bool array."""
    runs, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def assert_labels_legible(grid: Image.Image, columns: int, image_size: int):
    """Every column's label is inside its own column with white on both sides (adjacent labels never
    touch or overlap), above the image (never drawn over it), and in text lines tall enough to read."""
    strip, column, _ = grid_cells(grid, columns, image_size)
    ink = strip.min(axis=2) < 128  # dark text on the white strip
    assert not ink[-1].any(), "text reaches the image"
    for i in range(columns):
        cell = ink[:, i * column:(i + 1) * column]
        xs = np.nonzero(cell.any(axis=0))[0]
        assert xs.size, f"column {i}: no label"
        assert xs.min() >= 2 and xs.max() <= column - 3, f"column {i}: label at x {xs.min()}..{xs.max()} of {column}"
        lines = ink_runs(cell.any(axis=1))
        assert lines and all(stop - start >= 6 for start, stop in lines), f"column {i}: text lines {lines}"


def test_generate_writes_png_with_round_tripping_infotext(saved, tmp_path):
    out = tmp_path / "cat.png"
    code = main(["generate", "--model", saved["sd3"], "--prompt", "a photo of cat", "--negative", "blurry, text",
                 "--preset", "VSF Strong", "--start", "0.1", "--lambda", "2", *SMALL, "--out", str(out)])
    assert code == 0 and out.exists()
    text = read_png_infotext(out)
    assert text.startswith("a photo of cat\nNegative prompt: blurry, text\n")
    assert "Steps: 2" in text and "Size: 16x16" in text
    assert VSFSettings.from_infotext(text) == from_preset("VSF Strong", start=0.1, flux_lambda=2.0)


def test_empty_negative_writes_a_plain_image_without_vsf_keys(saved, tmp_path, capsys):
    out, plain = tmp_path / "plain.png", tmp_path / "vsf-off.png"
    assert main(["generate", "--model", saved["sd3"], "--prompt", "a photo of cat", "--negative", "",
                 "--preset", "VSF Strong", *SMALL, "--out", str(out)]) == 0
    text = read_png_infotext(out)
    assert not [key for key in parse_infotext(text) if key.startswith("VSF")]
    with pytest.raises(VSFSettingsError, match="no VSF parameters"):
        VSFSettings.from_infotext(text)
    assert text.startswith("a photo of cat\nSteps: 2, ") and "Negative prompt" not in text  # WebUI form
    assert "negative prompt is empty" in capsys.readouterr().err
    # the image is the plain pass: the same as with a whitespace-only negative
    assert main(["generate", "--model", saved["sd3"], "--prompt", "a photo of cat", "--negative", "  ",
                 *SMALL, "--out", str(plain)]) == 0
    with Image.open(out) as a, Image.open(plain) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_compare_without_negative_is_a_clear_error(saved, tmp_path, capsys):
    code = main(["generate", "--model", saved["sd3"], "--prompt", "a cat", "--compare", *SMALL,
                 "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--compare needs a negative prompt" in err and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("size", [16, 32, 64, 128, 512])
def test_labelled_grid_keeps_every_label_inside_its_column(size):
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (90, 90, 90)]
    images = [Image.new("RGB", (size, size), c) for c in colours]
    grid = labelled_grid(images, COMPARE_LABELS)
    assert_labels_legible(grid, 4, size)
    _, _, cells = grid_cells(grid, 4, size)
    for cell, colour in zip(cells, colours):  # each image whole, in order, untouched by text
        assert (cell == np.array(colour, dtype=np.uint8)).all()


def test_wrap_label_keeps_every_word_in_order():
    font = ImageFont.load_default()
    for label in COMPARE_LABELS:
        for width in (1, 30, 60, 1000):
            lines = wrap_label(label, font, width)
            assert " ".join(w for line in lines for w in line) == label


def test_compare_columns_use_the_step_window_lambda_and_own_numbers(saved, tmp_path):
    """Each method column keeps its own numbers (VSF: the SD3 default 3.5/0.1; NAG and NASA: their
    presets) and takes the given start/end/lambda; the infotext records every column."""
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", saved["sd3"], "--prompt", "a photo of cat", "--negative", "blurry",
                 "--compare", "--start", "0.25", "--end", "0.75", "--lambda", "2", *SMALL,
                 "--out", str(out)]) == 0
    params = parse_infotext(read_png_infotext(out))
    window = dict(start=0.25, end=0.75, flux_lambda=2.0)
    assert params["Compare 1"] == "none"
    assert VSFSettings.from_infotext(params["Compare 2"]) == VSFSettings("vsf", alpha=3.5, beta=0.1, **window)
    assert VSFSettings.from_infotext(params["Compare 3"]) == VSFSettings("nag", alpha=4.0, beta=0.125, tau=2.5,
                                                                         **window)
    assert VSFSettings.from_infotext(params["Compare 4"]) == VSFSettings("nasa", alpha=0.15, beta=0.0, **window)
    # the top-level VSF keys are the settings asked for (here the VSF column), so pasting restores them
    assert VSFSettings.from_infotext(params) == VSFSettings("vsf", alpha=3.5, beta=0.1, **window)


def test_compare_grid_is_legible_keeps_the_chosen_numbers_and_the_window(saved, tmp_path):
    """32 px images (the tiny SD3's largest); NAG chosen with alpha 6: its column keeps 6, VSF and NASA
    their own numbers. 2 steps, start 0.9: no step is guided, so every column is the unguided image,
    pixel for pixel."""
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", saved["sd3"], "--prompt", "a photo of cat", "--negative", "blurry",
                 "--compare", "--method", "nag", "--alpha", "6", "--start", "0.9", *sized(32),
                 "--out", str(out)]) == 0
    with Image.open(out) as grid:
        assert_labels_legible(grid, 4, 32)
        _, _, cells = grid_cells(grid, 4, 32)
    labels = ["unguided", "VSF a=3.5 b=0.1", "NAG a=6 b=0.125", "NASA a=0.15 b=0"]
    for label, cell in zip(labels[1:], cells[1:]):
        assert np.array_equal(cell, cells[0]), f"{label} column is guided outside the window"
    params = parse_infotext(read_png_infotext(out))
    assert params["Compare"] == " | ".join(labels)
    assert VSFSettings.from_infotext(params["Compare 2"]) == VSFSettings("vsf", alpha=3.5, beta=0.1, start=0.9)
    assert VSFSettings.from_infotext(params["Compare 3"]) == VSFSettings("nag", alpha=6.0, beta=0.125, start=0.9)
    assert VSFSettings.from_infotext(params["Compare 4"]) == VSFSettings("nasa", alpha=0.15, beta=0.0, start=0.9)
    assert VSFSettings.from_infotext(params) == VSFSettings("nag", alpha=6.0, beta=0.125, start=0.9)


def test_video_family_writes_gif_with_parameters(saved, tmp_path):
    out = tmp_path / "clip.gif"
    assert main(["generate", "--model", saved["wan"], "--prompt", "a photo of cat", "--negative", "blurry",
                 "--frames", "5", *SMALL, "--out", str(out)]) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 5
        assert VSFSettings.from_infotext(gif.info["comment"].decode()).alpha == 1.7  # Wan default


def test_bad_setting_is_a_clear_error_without_traceback(saved, tmp_path, capsys):
    code = main(["generate", "--model", saved["sd3"], "--prompt", "a cat", "--negative", "blurry",
                 "--start", "0.9", "--end", "0.2", *SMALL, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "start (0.9) must be smaller than end (0.2)" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_unsupported_pipeline_is_a_clear_error(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    code = main(["generate", "--model", str(tmp_path / "ddpm"), "--prompt", "x", "--out", str(tmp_path / "y.png")])
    err = capsys.readouterr().err
    assert code == 2 and "does not support DDPMPipeline" in err and "Stable Diffusion 3" in err


def test_module_entry_point_lists_presets():
    out = subprocess.run([sys.executable, "-m", "lib_vsf", "presets"], capture_output=True, text=True, check=True)
    assert "VSF Quality  VSF method: vsf, VSF alpha: 3.3, VSF beta: 0.2" in out.stdout


def test_presets_lists_every_family_default_and_marks_the_untuned_ones(capsys):
    from lib_vsf.cli import main

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    defaults = {line.split()[1]: line for line in lines if line.startswith("default ")}
    assert set(defaults) == {"sd3", "flux", "wan", "unet", "zimage", "flux2", "qwenimage", "chroma"}
    assert "VSF alpha: 3.5, VSF beta: 0.1" in defaults["sd3"] and "VSF lambda: 8" in defaults["flux"]
    assert [f for f, line in defaults.items() if "untuned" in line] == ["zimage", "flux2", "qwenimage", "chroma"]
