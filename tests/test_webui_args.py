"""Script arguments: the UI's positional list and the API's list and object forms (lib_vsf/webui/args.py)."""
from __future__ import annotations

import pytest

from lib_vsf.settings import PRESETS, VSFSettingsError
from lib_vsf.webui.args import API_KEYS, UI_ARGS, UI_DEFAULTS, parse_script_args


def test_ui_defaults_parse_to_the_model_default_off_with_single_pass():
    args = parse_script_args([UI_DEFAULTS[name] for name in UI_ARGS])
    assert (args.enabled, args.single_pass, args.preset) == (False, True, "Model default")
    # the authors' per-family numbers (README): SD3 3.5/0.1, Flux 6/0.2 with lambda 8, Wan 1.7/0.2, UNets 3.3/0.2
    numbers = lambda s: (s.method, s.alpha, s.beta, s.flux_lambda, s.start, s.end)  # noqa: E731
    assert numbers(args.for_family("sd3").settings) == ("vsf", 3.5, 0.1, 0.0, 0.0, 1.0)
    assert numbers(args.for_family("flux").settings) == ("vsf", 6.0, 0.2, 8.0, 0.0, 1.0)
    assert numbers(args.for_family("wan").settings) == ("vsf", 1.7, 0.2, 0.0, 0.0, 1.0)
    assert numbers(args.for_family("unet").settings) == ("vsf", 3.3, 0.2, 0.0, 0.0, 1.0)


def test_positional_list_with_model_default_uses_only_the_values_moved_off_the_ui_defaults():
    untouched = parse_script_args([True, "VSF", "Model default", 3.3, 0.2, 0.0, 0.1, 0.9, True])
    assert untouched.preset == "Model default"
    s = untouched.for_family("flux").settings
    assert (s.alpha, s.beta, s.flux_lambda, s.start, s.end) == (6.0, 0.2, 8.0, 0.1, 0.9)
    moved = parse_script_args([True, "VSF", "Model default", 5.0, 0.2, 0.0, 0.0, 1.0, True])
    assert moved.preset == "Custom"
    s = moved.for_family("flux").settings
    assert (s.alpha, s.beta, s.flux_lambda) == (5.0, 0.2, 8.0)


def test_api_object_without_a_preset_gets_the_model_default_with_explicit_values_over_it():
    numbers = lambda s: (s.method, s.alpha, s.beta, s.tau, s.flux_lambda, s.start, s.end)  # noqa: E731
    plain = parse_script_args([{}])
    assert plain.preset == "Model default"
    assert numbers(plain.for_family("sd3").settings) == ("vsf", 3.5, 0.1, 2.5, 0.0, 0.0, 1.0)
    window = parse_script_args([{"start": 0.25, "end": 0.75}])  # the window is not the model's: same label
    assert window.preset == "Model default"
    assert numbers(window.for_family("flux").settings) == ("vsf", 6.0, 0.2, 2.5, 8.0, 0.25, 0.75)
    custom = parse_script_args([{"alpha": 4, "lambda": 2}])
    assert custom.preset == "Custom"
    assert numbers(custom.for_family("sd3").settings) == ("vsf", 4.0, 0.1, 2.5, 2.0, 0.0, 1.0)
    assert numbers(custom.for_family("flux").settings) == ("vsf", 4.0, 0.2, 2.5, 2.0, 0.0, 1.0)
    # NAG and NASA named without a preset: their own defaults, whatever the model
    assert numbers(parse_script_args([{"method": "nag"}]).for_family("sd3").settings) == \
        ("nag", 4.0, 0.125, 2.5, 0.0, 0.0, 1.0)
    # an explicit named preset is what it says, on every model
    assert parse_script_args([{"preset": "VSF Quality"}]).for_family("sd3").settings == PRESETS["VSF Quality"]
    # explicit values are checked at once, before the model is known
    with pytest.raises(VSFSettingsError, match="must be smaller than end"):
        parse_script_args([{"start": 0.9, "end": 0.1}])


def test_positional_list_takes_the_slider_values():
    args = parse_script_args([True, "NASA", "Custom", 0.3, 0.0, 8.0, 0.25, 0.75, False])
    s = args.settings
    assert (args.enabled, s.method, s.alpha, s.flux_lambda, s.start, s.end, args.single_pass) == \
        (True, "nasa", 0.3, 8.0, 0.25, 0.75, False)


def test_short_list_keeps_ui_defaults_for_missing_trailing_values():
    args = parse_script_args([True, "VSF"])
    assert args.enabled and args.settings == PRESETS["VSF Quality"] and args.single_pass


def test_nag_preset_brings_its_tau_which_has_no_slider():
    args = parse_script_args([True, "NAG", "NAG Strong", 11.0, 0.5, 0.0, 0.0, 1.0, True])
    assert args.settings.tau == PRESETS["NAG Strong"].tau and args.preset == "NAG Strong"


def test_sliders_moved_away_from_the_preset_record_custom():
    args = parse_script_args([True, "VSF", "VSF Strong", 4.5, 0.2, 0.0, 0.0, 1.0, True])
    assert args.preset == "Custom" and args.settings.alpha == 4.5


def test_api_object_applies_preset_then_explicit_numbers():
    args = parse_script_args([{"preset": "VSF Strong", "beta": 0.5, "lambda": 8, "start": 0.1, "end": 0.9}])
    s = args.settings
    assert args.enabled  # sending the object asks for VSF
    assert (s.method, s.alpha, s.beta, s.flux_lambda, s.start, s.end) == ("vsf", 3.8, 0.5, 8.0, 0.1, 0.9)
    assert args.preset == "Custom"


def test_api_object_with_trailing_ui_defaults_uses_the_object():
    args = parse_script_args([{"enabled": True, "method": "nag", "preset": "Custom", "alpha": 4}, "VSF", "VSF Quality", 3.3])
    assert args.settings.method == "nag" and args.settings.alpha == 4.0


def test_api_object_can_disable_and_keep_cfg():
    args = parse_script_args([{"enabled": False, "single_pass": False}])
    assert not args.enabled and not args.single_pass


def test_show_map_is_off_by_default_and_asked_for_in_either_api_form():
    from lib_vsf.webui.xyz import apply_overrides

    assert UI_DEFAULTS["show_map"] is False and UI_ARGS[9] == "show_map" and "show_map" in API_KEYS
    assert not parse_script_args([True]).show_map and not parse_script_args([{}]).show_map
    as_list = parse_script_args([True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 1.0, True, True])
    as_object = parse_script_args([{"show_map": True}])
    assert as_list.show_map and as_object.show_map and as_list.values()[9] is True
    # it changes nothing else, survives the model default, a preset and an X/Y/Z cell
    assert as_list.settings == parse_script_args([True, "VSF", "VSF Quality", 3.3, 0.2]).settings
    assert as_object.for_family("flux").show_map and parse_script_args([{"preset": "NAG", "show_map": True}]).show_map
    assert apply_overrides(as_list, {"alpha": 5.0}).show_map
    assert apply_overrides(as_object, {"preset": "VSF Strong"}).show_map
    assert not apply_overrides(parse_script_args([True]), {"alpha": 5.0}).show_map


@pytest.mark.parametrize("bad, message", [
    ([{"alpha": -1}], "alpha must be between"),
    ([{"alpha": "lots"}], "alpha must be a number"),
    ([{"method": "cfg"}], "unknown VSF method"),
    ([{"preset": "Best"}], "unknown VSF preset"),
    ([{"aplha": 3}], "unknown VSF key"),
    ([{"start": 0.8, "end": 0.2}], "start"),
    ([{"enabled": "maybe"}], "enabled must be true or false"),
    ([{"enabled": "yes"}], "enabled must be true or false"),
    ([{"enabled": "false"}], "enabled must be true or false"),
    ([{"enabled": 1}], "enabled must be true or false"),
    ([{"enabled": None}], "enabled must be true or false"),
    ([{"single_pass": "no"}], "single pass must be true or false"),
    ([{"single_pass": 0}], "single pass must be true or false"),
    (["true"], "enabled must be true or false"),
    ([True, "VSF", "VSF Quality", 3.3, 0.2, 0, 0.5, 0.5, True], "must be smaller than end"),
    ([True, "VSF", "VSF Quality", 3.3, 0.2, 0, 0, 1, True, False, None, "extra"], "at most"),
    ([{"show_map": "yes"}], "show map must be true or false"),
    ([{"show_map": 1}], "show map must be true or false"),
    ([True, "VSF", "VSF Quality", 3.3, 0.2, 0, 0, 1, True, "true"], "show map must be true or false"),
    (["yes please"], "enabled must be true or false"),
])
def test_bad_values_raise_a_clear_error(bad, message):
    with pytest.raises(VSFSettingsError, match=message):
        parse_script_args(bad)


def test_values_round_trip_through_the_positional_form():
    args = parse_script_args([{"preset": "NASA", "start": 0.2}])
    again = parse_script_args(args.values())
    assert again.settings == args.settings and again.enabled == args.enabled and again.preset == args.preset


# -- the negative image slot (edit models; docs/negative-images.md) ------------------------------------------

def png_base64(image):
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def picture(mode="RGB"):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(7).integers(0, 255, (12, 20, 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode)


def test_negative_image_is_the_last_slot_and_arrives_as_pil_or_base64_in_either_api_form():
    import numpy as np

    assert UI_ARGS[-1] == "negative_image" and UI_ARGS[:10] == ("enabled", "method", "preset", "alpha", "beta",
                                                                "lambda", "start", "end", "single_pass", "show_map")
    assert "negative_image" in API_KEYS and UI_DEFAULTS["negative_image"] is None
    image = picture("RGBA")  # what a user may upload: converted to RGB, as the model takes it
    want = np.asarray(image.convert("RGB"))
    encoded = png_base64(image)
    forms = {
        "ui": parse_script_args([True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 1.0, True, False, image]),
        "list": parse_script_args([True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 1.0, True, False, encoded]),
        "object": parse_script_args([{"negative_image": encoded}]),
        "data url": parse_script_args([{"negative_image": "data:image/png;base64," + encoded}]),
    }
    for name, args in forms.items():
        assert args.negative_image.mode == "RGB" and np.array_equal(np.asarray(args.negative_image), want), name
    # nothing else changes, and none is the default in every form
    assert forms["list"].settings == parse_script_args([True, "VSF", "VSF Quality", 3.3, 0.2]).settings
    for none in ([True], [{}], [True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 1.0, True, False, None],
                 [{"negative_image": ""}], [{"negative_image": None}]):
        assert parse_script_args(none).negative_image is None
    # it survives the model default, a named preset, the positional round trip and an X/Y/Z cell
    from lib_vsf.webui.xyz import apply_overrides

    assert forms["object"].for_family("flux").negative_image is forms["object"].negative_image
    assert parse_script_args([{"preset": "VSF Strong", "negative_image": encoded}]).negative_image is not None
    assert parse_script_args(forms["list"].values()).negative_image is forms["list"].negative_image
    for overrides in ({"alpha": 5.0}, {"preset": "VSF Strong"}, {"preset": "Model default", "beta": 0.3}):
        assert apply_overrides(forms["ui"], overrides).negative_image is forms["ui"].negative_image
        assert apply_overrides(forms["object"], overrides).negative_image is forms["object"].negative_image


@pytest.mark.parametrize("bad, message", [
    ("not base64 at all!", "not valid base64"),
    ("aGVsbG8gd29ybGQ=", "could not be read as an image"),  # valid base64 of "hello world"
    ("data:image/png,abcd", "must be base64"),
    (12, "must be a base64-encoded image, got int"),
    ([1, 2], "must be a base64-encoded image, got list"),
])
def test_unreadable_negative_images_are_refused_clearly(bad, message):
    with pytest.raises(VSFSettingsError, match=message):
        parse_script_args([{"negative_image": bad}])
    with pytest.raises(VSFSettingsError, match=message):
        parse_script_args([True, "VSF", "VSF Quality", 3.3, 0.2, 0.0, 0.0, 1.0, True, False, bad])


def test_negative_image_hash_is_the_sha256_of_the_rgb_png():
    import hashlib
    import io

    from lib_vsf.webui.args import negative_image_hash

    image = picture("RGBA")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    assert negative_image_hash(image) == hashlib.sha256(buffer.getvalue()).hexdigest()[:10]
    other = image.copy()
    other.putpixel((0, 0), (0, 0, 0, 255) if image.getpixel((0, 0))[:3] != (0, 0, 0) else (1, 1, 1, 255))
    assert negative_image_hash(other) != negative_image_hash(image) and len(negative_image_hash(image)) == 10
