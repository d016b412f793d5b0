"""The negative-attention map ("where the negative acts"): per image token, 1 - W (paper eq. 8).

For one image query, with s = q.k * scale:

    A+ = sum over every key the image attends to except N1 of exp(s)
    A- = sum over the real negative keys N of exp(s - beta)
    W  = A+ / (A+ + A-),   the map records 1 - W, averaged over heads.

The expected values below are written from that equation in plain float64 torch, independent of the
project's attention code. Then: the per-layer / per-step averaging, map on vs off on tiny pipelines
(bit-identical images), NAG / NASA (undefined), and that the map off adds no work.
"""
import math
import warnings

import pytest
import torch

from lib_vsf.attention import fast as attention_fast
from lib_vsf.attention import Guidance, cross_attention, joint_attention
from lib_vsf.attention.reference import vsf_cross_reference, vsf_joint_reference
from lib_vsf.layout import text_layout
from lib_vsf.settings import VSFSettings
from lib_vsf.state import GuidanceRun, LatentGrid, NegativeShareMap

ALPHA, BETA = 3.3, 0.7


class Recorder:
    """Collects what the attention call hands over (the test's own, not the project's map)."""

    def __init__(self):
        self.calls = []

    def add(self, share):
        self.calls.append(share.detach().double().clone())


def eq8_share(q, k, image_rows, plus_keys, negative_keys, negative_real, beta, scale):
    """1 - W per image query, mean over heads, [B, len(image_rows)]: paper eq. 8 in float64.
    `plus_keys`: positions summed into A+; `negative_keys`: the negative positions (N), of which
    `negative_real[b, j]` says which are real tokens of sample b."""
    q, k = q.double(), k.double()
    s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, image_rows], k) * scale
    a_plus = torch.exp(s[..., plus_keys]).sum(dim=-1)
    neg = torch.exp(s[..., negative_keys] - beta) * negative_real[:, None, None, :].double()
    a_minus = neg.sum(dim=-1)
    w = a_plus / (a_plus + a_minus)
    return (1.0 - w).mean(dim=1)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.delenv("VSF_ATTENTION_BACKEND", raising=False)
    attention_fast.reset_backend_cache()
    yield
    attention_fast.reset_backend_cache()


# --- one attention call against eq. 8 ------------------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("negative_first", [False, True])
def test_joint_share_is_one_minus_w_of_eq8(padded, negative_first):
    """Joint attention: image rows' A+ over {I, P}, A- over the real N0 keys (logit - beta); padding in N
    (two samples with 5 and 3 negative tokens) is left out of A-."""
    batch, heads, dim, n_img, n_pos, n_neg = 2, 3, 8, 12, 6, 5
    total = n_img + n_pos + n_neg
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]]) if padded else None
    if negative_first:  # text first, negatives first: [N0, P, I]
        layout = text_layout(n_pos, n_neg, negative_first=True, total=total, negative_mask=mask)
        image = list(range(n_neg + n_pos, total))
    else:  # [I, P, N0]
        layout = text_layout(n_pos, n_neg, offset=n_img, negative_mask=mask)
        image = list(range(n_img))
    positive = list(range(layout.positive.start, layout.positive.stop))
    negative = list(range(layout.negative.start, layout.negative.stop))
    q, k, v = (randn(batch, heads, total, dim, seed=s) for s in (1, 2, 3))
    scale = 1 / math.sqrt(dim)
    real = mask if padded else torch.ones(batch, n_neg, dtype=torch.bool)
    want = eq8_share(q, k, image, sorted(image + positive), negative, real, BETA, scale)

    fast, ref = Recorder(), Recorder()
    out_on = joint_attention(q, k, v, layout, Guidance("vsf", ALPHA, BETA), negative_share=fast)
    vsf_joint_reference(q, k, v, layout, ALPHA, BETA, negative_share=ref)
    for rec in (fast, ref):
        assert len(rec.calls) == 1 and rec.calls[0].shape == (batch, n_img)
        torch.testing.assert_close(rec.calls[0], want, rtol=1e-5, atol=1e-6)
    assert float(want.min()) > 0.01  # the check is not vacuous: the negative holds real mass
    out_off = joint_attention(q, k, v, layout, Guidance("vsf", ALPHA, BETA))
    assert torch.equal(out_on, out_off)


@pytest.mark.parametrize("padded", [False, True])
def test_cross_share_is_one_minus_w_of_eq8(padded):
    """Cross-attention (paper eq. 9): image queries over [P, N]; A+ over P, A- over the real N."""
    batch, heads, dim, n_img, n_pos, n_neg = 2, 2, 16, 10, 7, 4
    mask = torch.tensor([[True] * 4, [True, False, False, False]]) if padded else None
    layout = text_layout(n_pos, n_neg, negative_mask=mask)
    q = randn(batch, heads, n_img, dim, seed=4)
    k, v = (randn(batch, heads, n_pos + n_neg, dim, seed=s) for s in (5, 6))
    scale = 1 / math.sqrt(dim)
    real = mask if padded else torch.ones(batch, n_neg, dtype=torch.bool)
    want = eq8_share(q, k, list(range(n_img)), list(range(n_pos)), list(range(n_pos, n_pos + n_neg)),
                     real, BETA, scale)
    fast, ref = Recorder(), Recorder()
    out_on = cross_attention(q, k, v, layout, Guidance("vsf", ALPHA, BETA), negative_share=fast)
    vsf_cross_reference(q, k, v, layout, ALPHA, BETA, negative_share=ref)
    for rec in (fast, ref):
        assert len(rec.calls) == 1
        torch.testing.assert_close(rec.calls[0], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out_on, cross_attention(q, k, v, layout, Guidance("vsf", ALPHA, BETA)))


def test_cross_share_in_the_general_layout():
    """Keys [extra, P, N] (a layout the single-SDPA form serves): A+ over P only, A- over N."""
    batch, heads, dim, n_img = 1, 2, 8, 6
    layout = text_layout(5, 3, offset=2)  # two leading keys that are not text: left out of both sums
    q = randn(batch, heads, n_img, dim, seed=7)
    k, v = (randn(batch, heads, 10, dim, seed=s) for s in (8, 9))
    want = eq8_share(q, k, list(range(n_img)), list(range(2, 7)), list(range(7, 10)),
                     torch.ones(batch, 3, dtype=torch.bool), BETA, 1 / math.sqrt(dim))
    rec = Recorder()
    out_on = cross_attention(q, k, v, layout, Guidance("vsf", ALPHA, BETA), negative_share=rec)
    torch.testing.assert_close(rec.calls[0], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out_on, cross_attention(q, k, v, layout, Guidance("vsf", ALPHA, BETA)))


def test_infinite_beta_records_zero_share():
    layout = text_layout(4, 3, offset=6)
    q, k, v = (randn(1, 2, 13, 8, seed=s) for s in (1, 2, 3))
    rec = Recorder()
    joint_attention(q, k, v, layout, Guidance("vsf", 0.0, float("inf")), negative_share=rec)
    assert torch.equal(rec.calls[0], torch.zeros(1, 6, dtype=torch.float64))


# --- averaging over heads (above), layers and steps -------------------------------------------------------

def test_map_averages_layers_within_a_step_then_the_guided_steps():
    step = {"now": 0}
    recorder = NegativeShareMap(lambda: step["now"])
    recorder.grid = LatentGrid(1, 2, 2)
    layer_a0, layer_b0 = torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[0.3, 0.0, 0.1, 0.0]])
    layer_a2, layer_b2 = torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.tensor([[0.1, 0.3, 0.5, 0.7]])
    recorder.add(layer_a0)
    recorder.add(layer_b0)
    step["now"] = 2  # step 1 was outside the guidance window: nothing recorded
    recorder.add(layer_a2)
    recorder.add(layer_b2)
    per_step = recorder.per_step()
    assert sorted(per_step) == [0, 2]
    want0 = torch.tensor([[[0.2, 0.1], [0.2, 0.2]]])  # (a + b) / 2 on the 2 x 2 grid, row-major
    want2 = torch.tensor([[[0.3, 0.4], [0.5, 0.6]]])
    torch.testing.assert_close(per_step[0], want0)
    torch.testing.assert_close(per_step[2], want2)
    torch.testing.assert_close(recorder.mean(), (want0 + want2) / 2)  # mean of the guided steps only
    recorder.reset()
    assert recorder.mean() is None and recorder.per_step() == {}


def test_map_places_video_frames_and_coarser_levels_on_the_grid():
    recorder = NegativeShareMap()
    recorder.grid = LatentGrid(2, 2, 3, video=True)  # tokens frame-major, then row-major
    recorder.add(torch.arange(12.0)[None] / 100)
    video = recorder.mean()
    assert video.shape == (1, 2, 2, 3)
    assert float(video[0, 1, 0, 2]) == pytest.approx(0.08)  # frame 1, row 0, col 2 = token 6 + 2
    # A UNet level at half resolution (4 x 4 grid -> 2 x 2 tokens) counts as one call among the others.
    unet = NegativeShareMap()
    unet.grid = LatentGrid(1, 4, 4)
    unet.add(torch.full((1, 16), 0.2))
    unet.add(torch.full((1, 4), 0.5))
    torch.testing.assert_close(unet.mean(), torch.full((1, 4, 4), 0.35))


def test_guidance_run_records_only_when_asked():
    run = GuidanceRun(VSFSettings())
    assert run.negative_map is None  # off by default: nothing to hand to the attention calls
    recorder = run.record_negative_map()
    run.set_step(3, 8)
    recorder.add(torch.ones(1, 4))
    assert recorder.steps == [3]


# --- NAG / NASA: no W ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["nag", "nasa"])
def test_nag_and_nasa_have_no_map(method):
    run = GuidanceRun(VSFSettings(method=method, alpha=0.5, beta=0.2))
    recorder = run.record_negative_map()
    assert "VSF only" in recorder.undefined_reason and method.upper() in recorder.undefined_reason
    layout = text_layout(4, 3, offset=6)
    q, k, v = (randn(1, 2, 13, 8, seed=s) for s in (1, 2, 3))
    spy = Recorder()
    joint_attention(q, k, v, layout, Guidance(method, 0.5, 0.2), negative_share=spy)
    assert spy.calls == []  # nothing is handed over for a method without W
    recorder.add(torch.ones(1, 6))
    assert recorder.mean() is None and recorder.per_step() == {}


# --- map off: no extra work --------------------------------------------------------------------------------

def _ops(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.key for e in prof.key_averages()]


@pytest.mark.parametrize("padded", [False, True])
def test_map_off_runs_no_reduction_and_map_on_one(padded):
    """The only extra work of the map is the head mean of 1 - W; with the map off there is none."""
    mask = torch.tensor([[True, True, False]]) if padded else None
    layout = text_layout(4, 3, offset=6, negative_mask=mask)
    q, k, v = (randn(1, 2, 13, 8, seed=s) for s in (1, 2, 3))
    g = Guidance("vsf", ALPHA, BETA)
    joint_attention(q, k, v, layout, g)  # backend choice and caches out of the way
    off = _ops(lambda: joint_attention(q, k, v, layout, g))
    on = _ops(lambda: joint_attention(q, k, v, layout, g, negative_share=Recorder()))
    assert "aten::mean" not in off and "aten::mean" in on


# --- tiny pipelines: map on vs off ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("diffusers")
    from tiny_pipelines import BUILDERS, call_args

    return BUILDERS, call_args


def _latents(pipe, name, call_args, vsf=None):
    kwargs = dict(prompt="a red car", output_type="latent", generator=torch.Generator().manual_seed(0),
                  **call_args(name))
    with torch.no_grad():
        out = (vsf or pipe)(**kwargs)
    return (out.frames if hasattr(out, "frames") else out.images).clone()


@pytest.mark.parametrize("name,shape", [("sd3", (1, 8, 8)), ("flux", (1, 4, 4)), ("sd15", (1, 8, 8)),
                                        ("wan", (1, 2, 1, 1))])
def test_map_on_gives_the_same_images_and_a_map_on_the_latent_grid(tiny, name, shape):
    from lib_vsf.diffusers import VSFGuidance

    builders, call_args = tiny
    pipe = builders[name]()
    with VSFGuidance(pipe, "blurry watermark") as vsf:
        off = _latents(pipe, name, call_args, vsf)
        assert vsf.negative_map() is None and vsf.run.negative_map is None
    with VSFGuidance(pipe, "blurry watermark", negative_map=True) as vsf:
        on = _latents(pipe, name, call_args, vsf)
        share, per_step = vsf.negative_map(), vsf.negative_map(per_step=True)
    assert torch.equal(on, off)
    assert share.shape == shape and sorted(per_step) == [0, 1, 2]
    assert 0.0 < float(share.min()) and float(share.max()) < 1.0
    torch.testing.assert_close(share, torch.stack(list(per_step.values())).mean(0))


def test_nag_map_through_vsf_guidance_is_none_with_a_warning(tiny):
    from lib_vsf.diffusers import VSFGuidance

    builders, call_args = tiny
    pipe = builders["sd3"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guidance = VSFGuidance(pipe, "blurry", VSFSettings(method="nag", alpha=4, beta=0.125), negative_map=True)
    assert any("VSF only" in str(w.message) for w in caught)
    with guidance as vsf:
        _latents(pipe, "sd3", call_args, vsf)
        assert vsf.negative_map() is None and "NAG" in vsf.negative_map_undefined


# --- CLI and the heatmap ---------------------------------------------------------------------------------

def test_figure_states_mean_and_max_and_flags_a_tiny_share():
    from lib_vsf.output import negative_share_figure

    big = negative_share_figure(torch.tensor([[0.10, 0.30], [0.20, 0.40]]))
    assert big == "negative share: mean 25.00%, max 40.00%"
    tiny = negative_share_figure(torch.tensor([[0.001, 0.015]]))
    assert tiny.startswith("negative share: mean 0.80%, max 1.50%")
    assert "tiny" in tiny and "raise alpha" in tiny and "lower beta" in tiny


def test_heatmap_is_hottest_where_the_share_is_largest():
    from PIL import Image

    from lib_vsf.output import negative_map_image

    share = torch.tensor([[0.05, 0.05], [0.05, 0.40]])  # bottom-right token holds most negative mass
    heat = negative_map_image(Image.new("RGB", (64, 64), (128, 128, 128)), share, caption=False)
    hot, cold = heat.getpixel((56, 56)), heat.getpixel((8, 8))
    assert hot[0] > cold[0] and hot[1] > cold[1] and hot[2] < cold[2]  # yellow vs dark blue end of the ramp


@pytest.fixture(scope="module")
def saved_sd3(tmp_path_factory, tiny):
    builders, _ = tiny
    path = tmp_path_factory.mktemp("pipes") / "sd3"
    builders["sd3"]().save_pretrained(path)
    return str(path)


CLI_SMALL = ["--steps", "2", "--width", "16", "--height", "16", "--max-sequence-length", "16"]


def test_cli_show_map_writes_the_map_png_with_its_figure(saved_sd3, tmp_path, capsys):
    from PIL import Image

    from lib_vsf.cli import main
    from lib_vsf.output import read_png_infotext

    out = tmp_path / "car.png"
    args = ["generate", "--model", saved_sd3, "--prompt", "a red car", "--negative", "blurry", *CLI_SMALL,
            "--out", str(out)]
    assert main(args + ["--show-map"]) == 0
    map_path = tmp_path / "car.map.png"
    assert map_path.exists() and "map: " in capsys.readouterr().err
    text = read_png_infotext(map_path)
    assert "VSF map: " in text and "negative share: mean" in text
    with Image.open(out) as with_map:
        image_with_map = with_map.convert("RGB").tobytes()
    assert main(args) == 0  # the same run without the map: the same image
    with Image.open(out) as plain:
        assert plain.convert("RGB").tobytes() == image_with_map


def test_cli_show_map_with_nag_says_undefined_and_writes_none(saved_sd3, tmp_path, capsys):
    from lib_vsf.cli import main

    out = tmp_path / "nag.png"
    assert main(["generate", "--model", saved_sd3, "--prompt", "a red car", "--negative", "blurry", "--method",
                 "nag", *CLI_SMALL, "--show-map", "--out", str(out)]) == 0
    assert "VSF only" in capsys.readouterr().err
    assert out.exists() and not (tmp_path / "nag.map.png").exists()


def test_cli_compare_with_show_map_adds_a_map_column(saved_sd3, tmp_path):
    from PIL import Image

    from lib_vsf.cli import main
    from lib_vsf.output import read_png_infotext

    base = ["generate", "--model", saved_sd3, "--prompt", "a red car", "--negative", "blurry", *CLI_SMALL,
            "--compare"]
    assert main(base + ["--out", str(tmp_path / "grid.png")]) == 0
    assert main(base + ["--show-map", "--out", str(tmp_path / "grid_map.png")]) == 0
    with Image.open(tmp_path / "grid.png") as grid, Image.open(tmp_path / "grid_map.png") as with_map:
        assert with_map.width * 4 == grid.width * 5  # one more column of the same width
        assert read_png_infotext(tmp_path / "grid_map.png") == read_png_infotext(tmp_path / "grid.png")


# --- the fused Triton merge (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1 set beforehand) ----

def _triton_usable():
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _triton_usable(), reason="needs Triton on CUDA, or TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_triton_merge_stores_one_minus_w_without_changing_its_output(dtype, padded):
    from lib_vsf.attention import triton_kernels as attention_triton

    if not attention_triton.AVAILABLE:
        pytest.skip("triton imports but is not usable")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, heads, rows, keys, n_neg, dim = 2, 3, 70, 9, 5, 16
    q = randn(batch, heads, rows, dim, seed=11).to(device, dtype)
    k, v = (randn(batch, heads, keys, dim, seed=s).to(device, dtype) for s in (12, 13))
    k_n, v_n = (randn(batch, heads, n_neg, dim, seed=s).to(device, dtype) for s in (14, 15))
    valid = torch.tensor([[True] * 5, [True, False, True, False, False]], device=device) if padded else None
    scale = 1 / math.sqrt(dim)
    o_i, lse_i = attention_fast.chunked_attention_lse(q, k, v, scale)
    share = torch.empty(batch, heads, rows, device=device, dtype=torch.float32)
    with_share = attention_triton.image_rows_vsf(o_i, lse_i, q, k_n, v_n, ALPHA, BETA, valid, scale, share=share)
    without = attention_triton.image_rows_vsf(o_i, lse_i, q, k_n, v_n, ALPHA, BETA, valid, scale)
    assert torch.equal(with_share, without)
    # eq. 8 over the keys of this merge: A+ = the main block, A- = the real negative keys (logit - beta)
    keys_all = torch.cat([k, k_n], dim=2).cpu()
    real = valid.cpu() if padded else torch.ones(batch, n_neg, dtype=torch.bool)
    want = eq8_share(q.cpu(), keys_all, list(range(rows)), list(range(keys)), list(range(keys, keys + n_neg)),
                     real, BETA, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # logits of 16-bit inputs, float32 accumulation
    torch.testing.assert_close(share.mean(dim=1).cpu().double(), want, rtol=tol, atol=tol)
