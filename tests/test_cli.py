"""`python -m lib_vsf generate` on tiny pipelines saved to a temp dir; metadata round trips."""
import subprocess
import sys

import pytest
from PIL import Image

from lib_vsf import VSFSettings, from_preset
from lib_vsf.cli import main
from lib_vsf.output import read_png_infotext
from tiny_pipelines import BUILDERS

SMALL = ["--steps", "2", "--width", "16", "--height", "16", "--max-sequence-length", "16"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    paths = {}
    for name in ("sd3", "wan"):
        BUILDERS[name]().save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def test_generate_writes_png_with_round_tripping_infotext(saved, tmp_path):
    out = tmp_path / "cat.png"
    code = main(["generate", "--model", saved["sd3"], "--prompt", "a photo of cat", "--negative", "blurry, text",
                 "--preset", "VSF Strong", "--start", "0.1", "--lambda", "2", *SMALL, "--out", str(out)])
    assert code == 0 and out.exists()
    text = read_png_infotext(out)
    assert text.startswith("a photo of cat\nNegative prompt: blurry, text\n")
    assert "Steps: 2" in text and "Size: 16x16" in text
    assert VSFSettings.from_infotext(text) == from_preset("VSF Strong", start=0.1, flux_lambda=2.0)


def test_compare_writes_one_labelled_grid(saved, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "--model", saved["sd3"], "--prompt", "a photo of cat", "--negative", "blurry",
                 "--compare", *SMALL, "--out", str(out)]) == 0
    with Image.open(out) as grid:
        assert grid.width == 4 * 16 and grid.height > 16
    text = read_png_infotext(out)
    assert "Compare: unguided | VSF a=3.5 b=0.1 | NAG a=4 b=0.125 | NASA a=0.15 b=0" in text


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
