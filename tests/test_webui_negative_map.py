""""Show where the negative acts" in the WebUI, through the host double (tests/webui_host_double.py): the
checkbox and both API forms, one map image per output in `extra_images` (never in `images` /
`infotexts`), its note line against the paper's eq. 8 written out here, the tiny-share advice, NAG, and
off = the same images with no recorder at all."""
from __future__ import annotations

import math
import re

import pytest
import torch

from lib_vsf.state import GuidanceRun, NegativeText
from lib_vsf.settings import VSFSettings
from lib_vsf.webui.hosts.base import append_negative
from lib_vsf.webui.hosts.unet_attn2 import patch_a1111
from webui_host_double import HEADS, POSITIVE_TOKENS, DoubleModel, Processing, host_double

GRID = (2, 3)  # image tokens of the double's model: outputs are 24 x 16 pixels
OFF = [True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 1.0, True, False]
ON = OFF[:-1] + [True]
NOTE = re.compile(r"Negative share: mean (\d+\.\d+)%, max (\d+\.\d+)%")


@pytest.fixture
def host():
    with host_double() as h:
        yield h


def generate(host, args, **kwargs):
    kwargs.setdefault("sd_model", DoubleModel(image_grid=GRID))
    p = host.process_images(Processing(host, **kwargs), args)
    assert not host.hook_errors
    return p


def pixels(images):
    return [(im.size, im.tobytes()) for im in images]


def eq8_share(q, text, positive_len, negative_mask, beta):
    """1 - W = A- / (A+ + A-) per image token, head mean (paper eq. 8 in cross-attention): A+ the
    exp-logit mass on the positive keys, A- on the real negative keys with the logit bias -beta."""
    b, length, width = q.shape
    d = width // HEADS
    qh = q.reshape(b, length, HEADS, d).transpose(1, 2)
    kh = text.reshape(b, -1, HEADS, d).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    a_pos = logits[..., :positive_len].exp().sum(-1)
    a_neg = ((logits[..., positive_len:] - beta).exp() * negative_mask[:, None, None, :]).sum(-1)
    return (a_neg / (a_pos + a_neg)).mean(dim=1)  # [B, image tokens]


def expected_shares(p, negatives, beta):
    """Per output image: the share averaged over the guided model calls of its batch (one per step)."""
    words = [len(n.split()) for n in negatives]
    out, guided = [], [t for t in p.trace if t["guided"] and "q" in t]
    assert len(guided) == p.n_iter * p.steps  # one guided call per step
    for n in range(p.n_iter):
        calls = guided[n * p.steps:(n + 1) * p.steps]
        rows = words[n * p.batch_size:(n + 1) * p.batch_size]  # the batch's negatives, padded to its longest
        mask = torch.tensor([[j < w for j in range(max(rows))] for w in rows])
        shares = torch.stack([eq8_share(c["q"], c["text"], POSITIVE_TOKENS, mask, beta) for c in calls]).mean(0)
        out.extend(shares)
    return out


def figures(text):
    found = NOTE.search(text)
    assert found, text
    return float(found.group(1)), float(found.group(2))


# -- asked for or not ----------------------------------------------------------------------------------------

def test_map_image_appears_only_when_asked_in_the_ui_and_both_api_forms(host):
    asked = {"ui": ON, "api list": host.api_args(ON),
             "api object": host.api_args([{"preset": "VSF Quality", "show_map": True}])}
    not_asked = {"ui": OFF, "api list": host.api_args(OFF[:9]),
                 "api object": host.api_args([{"preset": "VSF Quality"}]),
                 "api object off": host.api_args([{"preset": "VSF Quality", "show_map": False}])}
    for name, args in asked.items():
        p = generate(host, args, batch_size=2)
        assert len(p.processed.images) == len(p.processed.infotexts) == 2, name
        assert len(p.processed.extra_images) == 2, name
        assert len(host.api_images(p)) == 4, name  # the API's `images`: outputs, then the maps
        assert all(m.width >= out.width for m, out in zip(p.processed.extra_images, p.processed.images)), name
    for name, args in not_asked.items():
        p = generate(host, args, batch_size=2)
        assert p.processed.extra_images == [] and host.api_images(p) == p.processed.images, name
        assert not any(NOTE.search(text) for text in p.processed.infotexts), name


def test_one_map_per_output_with_batches_iterations_and_hires(host):
    p = generate(host, ON, batch_size=3, n_iter=2, enable_hr=True)
    assert len(p.processed.images) == len(p.processed.infotexts) == 6 and len(p.processed.extra_images) == 6
    assert all(im.size == (48, 32) for im in p.processed.images)  # the hires pass's outputs
    assert [c.split(":")[0] for c in p.comments if NOTE.search(c)] == [f"Image {i}" for i in range(1, 7)]
    # the hires pass (4x the tokens) made the image, so its map is the one shown: on the 4 x 6 grid
    run = p.trace[-1]["recorder"]
    assert run is not None and run.grid is not None and (run.grid.height, run.grid.width) == (4, 6)


# -- what it says --------------------------------------------------------------------------------------------

def test_note_line_is_each_images_share_of_eq8(host):
    negatives = ["blurry", "blurry, text, ugly", "text", "ugly, blurry"]  # padded rows, per image
    p = generate(host, ON, batch_size=2, n_iter=2, negative_prompts=negatives)
    want = expected_shares(p, negatives, beta=0.2)
    assert len(want) == len(p.processed.infotexts) == 4
    for share, infotext in zip(want, p.processed.infotexts):
        mean, peak = figures(infotext)  # each image's own `VSF note`
        assert mean == pytest.approx(100 * float(share.mean()), abs=0.006)
        assert peak == pytest.approx(100 * float(share.max()), abs=0.006)
        assert "tiny" not in infotext
    comments = [c for c in p.comments if NOTE.search(c)]
    assert [figures(c) for c in comments] == [figures(t) for t in p.processed.infotexts]  # under the image too


def test_tiny_share_says_so_and_suggests_raising_alpha_or_lowering_beta(host):
    p = generate(host, [True, "VSF", "Custom", 3.3, 10.0, 0.0, 0.0, 1.0, True, True], batch_size=1)
    (infotext,) = p.processed.infotexts
    mean, peak = figures(infotext)
    assert peak < 2.0  # the core's threshold: a maximum share under 2%
    assert "tiny" in infotext and "raise alpha or lower beta" in infotext
    assert [c for c in p.comments if NOTE.search(c)] == [re.search(r'VSF note: "[^"]*?(Negative share[^"]*)"',
                                                                    infotext).group(1)]


@pytest.mark.parametrize("method, preset", [("NAG", "NAG"), ("NASA", "Custom")])
def test_nag_and_nasa_say_the_map_is_undefined_and_add_no_image(host, method, preset):
    p = generate(host, [True, method, preset, 0.5, 0.1, 0.0, 0.0, 1.0, True, True], batch_size=2)
    assert p.processed.extra_images == [] and len(p.processed.images) == 2
    note = [c for c in p.comments if "map" in c]
    assert note == [f"VSF: no negative-attention map for this image: the negative-attention map is defined for "
                    f"VSF only: {method} has no attention weight W on the negative (paper eq. 8)."]
    assert all(note[0] in text for text in p.processed.infotexts)
    assert not any(NOTE.search(t) for t in p.processed.infotexts)


# -- off changes nothing, on changes no image ---------------------------------------------------------------

def test_off_records_nothing_and_on_gives_bit_identical_outputs(host):
    off = generate(host, OFF, batch_size=2, n_iter=2)
    on = generate(host, ON, batch_size=2, n_iter=2)
    disabled = generate(host, host.ui_defaults(), batch_size=2, n_iter=2)
    assert all(t["recorder"] is None for t in off.trace) and all(t["recorder"] is None for t in disabled.trace)
    assert any(t["recorder"] is not None for t in on.trace)
    assert pixels(off.processed.images) == pixels(on.processed.images)
    assert all(torch.equal(a, b) for a, b in zip(off.latents, on.latents)) and len(off.latents) == 2
    assert off.processed.infotexts == [re.sub(r', VSF note: "[^"]*"', "", t) for t in on.processed.infotexts]
    assert off.processed.extra_images == [] and disabled.processed.extra_images == []
    assert pixels(disabled.processed.images) != pixels(off.processed.images)  # the outputs do show VSF


def test_host_without_extra_result_images_gets_the_maps_after_the_outputs_with_infotexts(host):
    p = generate(host, ON, batch_size=2, extra_result_images=False)
    assert len(p.processed.images) == len(p.processed.infotexts) == 4
    assert p.processed.infotexts[2:] == [p.processed.infotexts[0]] * 2


# -- the A1111 UNet wrapper hands the recorder over too --------------------------------------------------------

def test_a1111_attn2_wrapper_records_eq8_and_keeps_its_output():
    from test_unet_adapter import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention()
    x = torch.randn(2, 6, 16)
    negative = NegativeText.from_sequences([torch.randn(4, 12), torch.randn(2, 12)])
    context = append_negative(torch.randn(2, 5, 12), negative)
    outs = {}
    for show in (False, True):
        run = GuidanceRun(VSFSettings(alpha=3.0, beta=0.2))
        run.set_step(0, 4)
        run.set_text(5, negative)
        recorder = run.record_negative_map() if show else None
        with torch.no_grad(), patch_a1111([CrossAttention], run):
            outs[show] = attn(x, context=context)
    assert torch.equal(outs[False], outs[True])
    q = attn.to_q(x).detach()
    k = attn.to_k(context).detach()
    want = eq8_share(q, k, 5, negative.mask, 0.2)
    torch.testing.assert_close(recorder.mean(), want, rtol=1e-5, atol=1e-6)


# -- not a generation parameter; where the tokens sit -------------------------------------------------------

def test_the_option_is_not_in_the_infotext_and_pasting_leaves_it_alone(host):
    from lib_vsf.settings import parse_infotext

    p = generate(host, ON, batch_size=1)
    text = p.processed.infotexts[0]
    assert "map" not in text.lower().replace("negative share", "")  # no key of its own, only the note line
    shown = host.components[9]  # "Show where the negative acts"
    shown.value = True
    pasted = host.paste(parse_infotext(text))
    assert pasted[9] is True and pasted[:9] == OFF[:9]  # every other control from the infotext


def test_grid_for_finds_the_token_grid_of_each_patch_size_and_video():
    from lib_vsf.webui.negative_map import grid_for

    assert (grid_for(8 * 12, 64, 96).height, grid_for(8 * 12, 64, 96).width) == (12, 8)  # UNet: 8 px a token
    assert (grid_for(4 * 6, 64, 96).height, grid_for(4 * 6, 64, 96).width) == (6, 4)  # DiT: 16 px
    assert (grid_for(3 * 3, 72, 72).height, grid_for(3 * 3, 72, 72).width) == (3, 3)  # rounded up
    video = grid_for(5 * 4 * 4, 64, 64)
    assert video.video and (video.frames, video.height, video.width) == (5, 4, 4)
    assert grid_for(7, 64, 64) is None


def test_a_videos_map_goes_with_its_first_frame_only():
    from PIL import Image

    from lib_vsf.webui.negative_map import OutputMap, map_for_output

    run = GuidanceRun(VSFSettings())
    recorder = run.record_negative_map()
    recorder.add(torch.rand(1, 3 * 4 * 4))
    frame = Image.new("RGB", (64, 64))
    assert isinstance(map_for_output(recorder, frame, 0), OutputMap)
    assert map_for_output(recorder, frame, 1) is None
    still = run.record_negative_map()
    still.add(torch.rand(1, 4 * 4))
    assert "rows" in map_for_output(still, frame, 1)  # an image batch row without a map says so
