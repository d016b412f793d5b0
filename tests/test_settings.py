"""Settings: presets from the paper / spec, validation with one clear error type, round trips."""
import math

import pytest

from lib_vsf import PRESETS, VSFSettings, VSFSettingsError, family_default, from_preset, preset_names
from lib_vsf.settings import matching_preset, parse_infotext


def test_presets_hold_the_spec_numbers():
    assert (PRESETS["VSF Quality"].method, PRESETS["VSF Quality"].alpha, PRESETS["VSF Quality"].beta) == ("vsf", 3.3, 0.2)
    assert (PRESETS["VSF Strong"].alpha, PRESETS["VSF Strong"].beta) == (3.8, 0.2)
    nag, strong = PRESETS["NAG"], PRESETS["NAG Strong"]
    assert (nag.method, nag.alpha, nag.beta, nag.tau) == ("nag", 4.0, 0.125, 2.5)
    assert (strong.alpha, strong.beta, strong.tau) == (11.0, 0.5, 5.0)
    assert (PRESETS["NASA"].method, PRESETS["NASA"].alpha) == ("nasa", 0.15)
    assert preset_names()[-1] == "Custom"


def test_family_defaults():
    assert (family_default("sd3").alpha, family_default("sd3").beta) == (3.5, 0.1)
    assert (family_default("flux").alpha, family_default("flux").flux_lambda) == (6.0, 8.0)
    assert (family_default("wan").alpha, family_default("wan").beta) == (1.7, 0.2)
    with pytest.raises(VSFSettingsError, match="unknown model family"):
        family_default("qwen")


@pytest.mark.parametrize("changes, message", [
    (dict(alpha=math.nan), "alpha must be a finite number"),
    (dict(alpha=math.inf), "alpha must be a finite number"),
    (dict(beta=-0.1), "beta must be between"),
    (dict(beta=math.inf), "beta must be a finite number"),
    (dict(alpha=-1.0), "alpha must be between"),
    (dict(start=0.5, end=0.5), "start .* must be smaller than end"),
    (dict(start=0.8, end=0.2), "start .* must be smaller than end"),
    (dict(end=1.5), "end must be between"),
    (dict(method="cfg"), "unknown VSF method 'cfg'"),
    (dict(alpha="3.3"), "alpha must be a number"),
    (dict(alpha=True), "alpha must be a number"),
    (dict(flux_lambda=-2), "lambda must be between"),
    (dict(method="nag", beta=2.0), "NAG blend"),
    (dict(alpha_schedule=(1.0, math.nan)), "alpha schedule value must be a finite"),
    (dict(alpha_schedule="3 4"), "alpha schedule must be a list"),
])
def test_bad_settings_raise_one_clear_error(changes, message):
    with pytest.raises(VSFSettingsError, match=message):
        VSFSettings(**changes)


def test_unknown_preset_and_keys():
    with pytest.raises(VSFSettingsError, match="unknown VSF preset 'Turbo'.*VSF Quality"):
        from_preset("Turbo")
    with pytest.raises(VSFSettingsError, match="unknown VSF setting"):
        VSFSettings.from_dict({"alpha": 3, "gamma": 1})
    with pytest.raises(VSFSettingsError, match="must be an object"):
        VSFSettings.from_dict(["vsf", 3])


def test_error_type_is_a_value_error_for_hosts():
    assert issubclass(VSFSettingsError, ValueError)


def test_window_and_schedule():
    s = VSFSettings(start=0.25, end=0.75)
    assert [s.is_active(i, 8) for i in range(8)] == [False, False, True, True, True, True, False, False]
    s = VSFSettings(alpha_schedule=(4.0, 2.0))
    assert [s.alpha_at(i, 4) for i in range(4)] == [4.0, 4.0, 2.0, 2.0]
    assert VSFSettings(alpha=3.0).alpha_at(5, 8) == 3.0


@pytest.mark.parametrize("settings", [
    VSFSettings(),
    from_preset("NAG Strong", start=0.1, end=0.9),
    VSFSettings("nasa", alpha=0.15, beta=0.0, flux_lambda=8.0),
    VSFSettings(alpha=2.5, beta=0.05, alpha_schedule=(3.0, 2.0, 1.5)),
])
def test_round_trips(settings):
    assert VSFSettings.from_dict(settings.to_dict()) == settings
    assert VSFSettings.from_infotext(settings.to_infotext()) == settings
    assert VSFSettings.from_infotext(settings.to_infotext_string()) == settings
    full = f"a cat\nNegative prompt: blurry, text\nSteps: 8, Sampler: Euler, {settings.to_infotext_string()}, Seed: 1"
    assert VSFSettings.from_infotext(full) == settings


@pytest.mark.parametrize("alpha", [1.23456789, 3.3, 0.1 + 0.2, 1e-05, 2.0 / 3.0, 12.000000000000002])
def test_infotext_numbers_round_trip_exactly(alpha):
    settings = VSFSettings(alpha=alpha, beta=0.123456789, start=1.0 / 3.0, flux_lambda=7.77777777777)
    text = settings.to_infotext_string()
    back = VSFSettings.from_infotext(text)
    assert (back.alpha, back.beta, back.start, back.flux_lambda) == (alpha, 0.123456789, 1.0 / 3.0, 7.77777777777)
    assert VSFSettings(alpha=3.0).to_infotext()["VSF alpha"] == "3"  # whole numbers stay short


def test_dict_accepts_preset_then_overrides_and_strings():
    s = VSFSettings.from_dict({"preset": "VSF Strong", "start": "0.2", "lambda": 8, "enabled": True})
    assert (s.alpha, s.beta, s.start, s.flux_lambda) == (3.8, 0.2, 0.2, 8.0)
    assert VSFSettings.from_dict({"preset": "Custom", "alpha": 1.0}).alpha == 1.0
    assert matching_preset(from_preset("NAG")) == "NAG"
    assert matching_preset(VSFSettings(alpha=1.23)) == "Custom"


def test_infotext_parser_handles_quotes():
    params = parse_infotext('Steps: 8, VSF method: vsf, Note: "a, b: c", VSF alpha: 3.3')
    assert params["Note"] == "a, b: c" and params["VSF alpha"] == "3.3"
    with pytest.raises(VSFSettingsError, match="no VSF parameters"):
        VSFSettings.from_infotext("Steps: 8, Sampler: Euler")
    with pytest.raises(VSFSettingsError, match="alpha must be a number"):
        VSFSettings.from_infotext("VSF method: vsf, VSF alpha: lots")
