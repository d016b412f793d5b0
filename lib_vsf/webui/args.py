"""The script's arguments: what `ui()` returns, what the HTTP API sends, turned into settings.

The UI's components arrive in `UI_ARGS` order. Through `/sdapi/v1/txt2img` and `img2img`,
`alwayson_scripts["Value Sign Flip"]["args"]` is copied into those slots verbatim, so two forms arrive:

- the positional list, `[enabled, method, preset, alpha, beta, lambda, start, end, single_pass]`
  (missing trailing values keep the UI defaults), where the numbers are what the sliders hold and the
  preset name is informational (the UI's preset already filled the sliders);
- one object in slot 0, `{"enabled", "method", "preset", "alpha", "beta", "lambda", "start", "end",
  "single_pass", "tau"}`, every key optional: the preset is applied first and explicit numbers
  override it; `enabled` defaults to true (sending the object asks for VSF).

Both give a `ScriptArgs` or raise `VSFSettingsError` with a message for the user.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..settings import (CUSTOM_PRESET, DEFAULT_PRESET, METHOD_LABELS, PRESETS, VSFSettings, VSFSettingsError,
                        from_preset, matching_preset)

SCRIPT_TITLE = "Value Sign Flip"  # the script's title: its key in the API's `alwayson_scripts`
UI_ARGS = ("enabled", "method", "preset", "alpha", "beta", "lambda", "start", "end", "single_pass")
API_KEYS = ("enabled", "method", "preset", "alpha", "beta", "lambda", "start", "end", "single_pass", "tau")

DEFAULT_SETTINGS = PRESETS[DEFAULT_PRESET]
UI_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "method": METHOD_LABELS[DEFAULT_SETTINGS.method],
    "preset": DEFAULT_PRESET,
    "alpha": DEFAULT_SETTINGS.alpha,
    "beta": DEFAULT_SETTINGS.beta,
    "lambda": DEFAULT_SETTINGS.flux_lambda,
    "start": DEFAULT_SETTINGS.start,
    "end": DEFAULT_SETTINGS.end,
    "single_pass": True,
}


@dataclass(frozen=True)
class ScriptArgs:
    """Parsed script arguments: whether VSF runs, with which settings, and whether CFG is replaced."""

    enabled: bool
    settings: VSFSettings
    single_pass: bool = True
    preset: str = DEFAULT_PRESET

    def values(self) -> list[Any]:
        """The positional list (UI order) that parses back to these arguments."""
        s = self.settings
        return [self.enabled, METHOD_LABELS[s.method], self.preset, s.alpha, s.beta, s.flux_lambda,
                s.start, s.end, self.single_pass]


def method_key(value: Any) -> str:
    """`"VSF"`, `"vsf"`, ... -> `"vsf"`; anything else raises VSFSettingsError."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in METHOD_LABELS:
            return key
    raise VSFSettingsError(f"unknown VSF method {value!r}; choose one of: {', '.join(METHOD_LABELS.values())}")


def as_bool(name: str, value: Any) -> bool:
    """A flag: JSON `true`/`false` (the UI's checkboxes send bools too). Nothing else is guessed at:
    `"yes"`, `"false"`, `1` or `null` are refused, so a typo cannot silently turn VSF on or off."""
    if isinstance(value, bool):
        return value
    raise VSFSettingsError(f"VSF {name} must be true or false, got {value!r}")


def preset_name(value: Any) -> str:
    """A preset name as the UI lists it (case-insensitive input), or `Custom`."""
    if value in (None, ""):
        return CUSTOM_PRESET
    if not isinstance(value, str):
        raise VSFSettingsError(f"VSF preset must be a name, got {value!r}")
    if value.strip().lower() == CUSTOM_PRESET.lower():
        return CUSTOM_PRESET
    for name in PRESETS:
        if name.lower() == value.strip().lower():
            return name
    raise VSFSettingsError(f"unknown VSF preset {value!r}; choose one of: {', '.join([*PRESETS, CUSTOM_PRESET])}")


def parse_script_args(args: Sequence[Any]) -> ScriptArgs:
    """`ScriptArgs` from the script's slot values (positional list or one object in slot 0)."""
    args = list(args or [])
    if args and isinstance(args[0], Mapping):
        return parse_api_object(args[0])
    if len(args) > len(UI_ARGS):
        raise VSFSettingsError(f"VSF takes at most {len(UI_ARGS)} arguments ({', '.join(UI_ARGS)}), got {len(args)}")
    values = dict(UI_DEFAULTS)
    values.update({k: v for k, v in zip(UI_ARGS, args) if v is not None})
    method = method_key(values["method"])
    preset = preset_name(values["preset"])
    # NAG's tau has no slider: it comes from the named preset when that preset is a NAG one.
    tau = PRESETS[preset].tau if preset != CUSTOM_PRESET and PRESETS[preset].method == method else DEFAULT_SETTINGS.tau
    settings = DEFAULT_SETTINGS.replace(method=method, alpha=values["alpha"], beta=values["beta"], tau=tau,
                                        flux_lambda=values["lambda"], start=values["start"], end=values["end"])
    if preset != CUSTOM_PRESET and matching_preset(settings) != preset:
        preset = CUSTOM_PRESET  # the sliders were moved away from the preset's numbers
    return ScriptArgs(as_bool("enabled", values["enabled"]), settings, as_bool("single pass", values["single_pass"]),
                      preset)


def parse_api_object(data: Mapping[str, Any]) -> ScriptArgs:
    """`ScriptArgs` from the API's single-object form (see the module docstring)."""
    unknown = [k for k in data if not isinstance(k, str) or k.strip().lower() not in API_KEYS + ("flux_lambda",)]
    if unknown:
        raise VSFSettingsError(f"unknown VSF key(s): {', '.join(map(str, unknown))}; known: {', '.join(API_KEYS)}")
    data = {k.strip().lower(): v for k, v in data.items()}
    enabled = as_bool("enabled", data.get("enabled", True))
    single_pass = as_bool("single pass", data.get("single_pass", UI_DEFAULTS["single_pass"]))
    preset = preset_name(data.get("preset", DEFAULT_PRESET))
    settings = DEFAULT_SETTINGS if preset == CUSTOM_PRESET else from_preset(preset)
    fields = {k: v for k, v in data.items() if k not in ("enabled", "single_pass", "preset")}
    if "method" in fields:
        fields["method"] = method_key(fields["method"])
    settings = VSFSettings.from_dict(fields, base=settings)
    if preset != CUSTOM_PRESET and matching_preset(settings) != preset:
        preset = CUSTOM_PRESET  # explicit numbers overrode the preset's
    return ScriptArgs(enabled, settings, single_pass, preset)
