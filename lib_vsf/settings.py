"""Validated guidance settings, presets and their flat-dict / infotext forms.

One `VSFSettings` object is what the WebUI, the HTTP API, the XYZ plot, the CLI and the diffusers
integration all pass around. It is immutable and always valid: every way to build one goes through
`validate()`, and every failure raises `VSFSettingsError` with a message a host can show as is.

The three methods share the same three numbers, named after VSF:

| method | alpha                         | beta                              | tau            |
|--------|-------------------------------|-----------------------------------|----------------|
| vsf    | value scale of negative (-a)  | logit bias on negative keys (>=0) | unused         |
| nag    | phi, the extrapolation scale  | a, the blend back to positive     | norm ratio cap |
| nasa   | a, subtraction scale          | unused                            | unused         |

`flux_lambda` is the Flux-only extrapolation of the negative text embedding (paper eq. 10).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

METHODS = ("vsf", "nag", "nasa")
METHOD_LABELS = {"vsf": "VSF", "nag": "NAG", "nasa": "NASA"}


class VSFSettingsError(ValueError):
    """A setting is out of range or unknown. The message is meant for the user, as is."""


@dataclass(frozen=True)
class VSFSettings:
    """Guidance parameters. Build with `VSFSettings(...)`, `from_preset`, `from_dict` or `from_infotext`."""

    method: str = "vsf"
    alpha: float = 3.3
    beta: float = 0.2
    tau: float = 2.5
    flux_lambda: float = 0.0
    start: float = 0.0
    end: float = 1.0
    alpha_schedule: tuple[float, ...] | None = None

    def __post_init__(self):
        _validate(self)

    # -- per-step --------------------------------------------------------------------------
    def is_active(self, step: int, total_steps: int) -> bool:
        """True when guidance applies at `step` (0-based) of `total_steps`: step/total in [start, end)."""
        if total_steps <= 0:
            return False
        fraction = step / total_steps
        return self.start <= fraction < self.end

    def alpha_at(self, step: int, total_steps: int) -> float:
        """Alpha for this step: the per-step list, stretched over the run, or the constant alpha."""
        if not self.alpha_schedule:
            return self.alpha
        index = int(step * len(self.alpha_schedule) / max(total_steps, 1))
        return self.alpha_schedule[min(max(index, 0), len(self.alpha_schedule) - 1)]

    def replace(self, **changes) -> "VSFSettings":
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    # -- flat dict (API, CLI, JSON) ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-safe dict; `from_dict(to_dict())` gives the same settings."""
        out = {
            "method": self.method,
            "alpha": self.alpha,
            "beta": self.beta,
            "tau": self.tau,
            "lambda": self.flux_lambda,
            "start": self.start,
            "end": self.end,
        }
        if self.alpha_schedule:
            out["alpha_schedule"] = list(self.alpha_schedule)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: "VSFSettings | None" = None) -> "VSFSettings":
        """Settings from a flat dict. Keys may be any of `DICT_KEYS`; a `preset` key is applied first
        and explicit numbers override it. Missing keys keep `base` (default: VSF Quality)."""
        if not isinstance(data, Mapping):
            raise VSFSettingsError(f"VSF settings must be an object/dict, got {type(data).__name__}")
        unknown = [k for k in data if _canonical_key(k) is None]
        if unknown:
            raise VSFSettingsError(
                f"unknown VSF setting(s): {', '.join(map(str, unknown))}; known: {', '.join(DICT_KEYS)}"
            )
        fields: dict[str, Any] = {}
        preset = None
        for key, value in data.items():
            name = _canonical_key(key)
            if name == "preset":
                preset = value
            elif name is not None and name not in ("enabled",):
                fields[name] = value
        settings = base or PRESETS[DEFAULT_PRESET]
        if preset not in (None, "", CUSTOM_PRESET):
            settings = from_preset(preset)
        return settings.replace(**{k: _coerce(k, v) for k, v in fields.items()})

    # -- infotext ---------------------------------------------------------------------------------
    def to_infotext(self) -> dict[str, str]:
        """`{"VSF method": "vsf", "VSF alpha": "3.3", ...}`: one entry per WebUI infotext key."""
        out = {INFOTEXT_KEYS[name]: _format_value(getattr(self, name)) for name in INFOTEXT_FIELDS}
        if self.alpha_schedule:
            out[INFOTEXT_KEYS["alpha_schedule"]] = " ".join(_format_value(a) for a in self.alpha_schedule)
        return out

    def to_infotext_string(self) -> str:
        """The WebUI's `Key: value, Key: value` form (values with commas or colons quoted)."""
        return ", ".join(f"{k}: {_quote(v)}" for k, v in self.to_infotext().items())

    @classmethod
    def from_infotext(cls, text: "str | Mapping[str, Any]") -> "VSFSettings":
        """Settings from an infotext string or an already parsed infotext dict. Keys that are not
        VSF keys are ignored (infotext carries the whole generation); VSF keys must be valid."""
        params = parse_infotext(text) if isinstance(text, str) else dict(text)
        by_key = {v: k for k, v in INFOTEXT_KEYS.items()}
        fields: dict[str, Any] = {}
        for key, value in params.items():
            name = by_key.get(str(key).strip())
            if name is None:
                continue
            if name == "alpha_schedule":
                value = [v for v in re.split(r"[\s,;]+", str(value).strip()) if v]
            fields[name] = value
        if "method" not in fields:
            raise VSFSettingsError("no VSF parameters in this infotext")
        base = PRESETS[DEFAULT_PRESET]
        return base.replace(**{k: _coerce(k, v) for k, v in fields.items()})


# -- presets ----------------------------------------------------------------------------------------
PRESETS: dict[str, VSFSettings] = {}
CUSTOM_PRESET = "Custom"
DEFAULT_PRESET = "VSF Quality"
# Not a fixed set of numbers: "whatever suits the model", resolved once the model is known (`model_default`).
MODEL_DEFAULT_PRESET = "Model default"


def _register_presets():
    PRESETS["VSF Quality"] = VSFSettings("vsf", alpha=3.3, beta=0.2)
    PRESETS["VSF Strong"] = VSFSettings("vsf", alpha=3.8, beta=0.2)
    PRESETS["NAG"] = VSFSettings("nag", alpha=4.0, beta=0.125, tau=2.5)
    PRESETS["NAG Strong"] = VSFSettings("nag", alpha=11.0, beta=0.5, tau=5.0)
    PRESETS["NASA"] = VSFSettings("nasa", alpha=0.15, beta=0.0)


# Per-family VSF defaults (the authors' repository README): used when a caller names no preset.
FAMILY_DEFAULTS: dict[str, VSFSettings] = {}
# Families whose defaults come from the paper or its authors' README; the others are untuned.
PAPER_TUNED_FAMILIES = ("sd3", "flux", "wan", "unet")


def _register_family_defaults():
    FAMILY_DEFAULTS["sd3"] = VSFSettings("vsf", alpha=3.5, beta=0.1)
    FAMILY_DEFAULTS["flux"] = VSFSettings("vsf", alpha=6.0, beta=0.2, flux_lambda=8.0)
    FAMILY_DEFAULTS["wan"] = VSFSettings("vsf", alpha=1.7, beta=0.2)
    FAMILY_DEFAULTS["unet"] = VSFSettings("vsf", alpha=3.3, beta=0.2)
    # Families the paper did not tune: untuned starting points (VSF Quality's numbers).
    FAMILY_DEFAULTS["zimage"] = VSFSettings("vsf", alpha=3.3, beta=0.2)
    FAMILY_DEFAULTS["flux2"] = VSFSettings("vsf", alpha=3.3, beta=0.2)
    FAMILY_DEFAULTS["qwenimage"] = VSFSettings("vsf", alpha=3.3, beta=0.2)
    FAMILY_DEFAULTS["chroma"] = VSFSettings("vsf", alpha=3.3, beta=0.2)  # no lambda: see diffusers/chroma.py


def preset_names() -> list[str]:
    """Preset names in display order, `Custom` last."""
    return [*PRESETS, CUSTOM_PRESET]


def from_preset(name: str, **overrides) -> VSFSettings:
    """Settings of a named preset (case-insensitive), optionally with fields overridden."""
    if not isinstance(name, str):
        raise VSFSettingsError(f"preset must be a name, got {name!r}")
    for key, settings in PRESETS.items():
        if key.lower() == name.strip().lower():
            return settings.replace(**overrides) if overrides else settings
    raise VSFSettingsError(f"unknown VSF preset {name!r}; choose one of: {', '.join(PRESETS)}")


def family_default(family: str) -> VSFSettings:
    """The VSF defaults for a model family (`sd3`, `flux`, `wan`, `unet`, `zimage`, `flux2`, `qwenimage`,
    `chroma`)."""
    try:
        return FAMILY_DEFAULTS[family]
    except KeyError:
        raise VSFSettingsError(
            f"unknown model family {family!r}; known: {', '.join(FAMILY_DEFAULTS)}"
        ) from None


def model_default(family: str | None, method: str = "vsf") -> VSFSettings:
    """What a caller who names no preset gets: for VSF the model family's default (`FAMILY_DEFAULTS`;
    VSF Quality while the family is unknown or has none), for NAG and NASA their own preset."""
    if method == "nag":
        return PRESETS["NAG"]
    if method == "nasa":
        return PRESETS["NASA"]
    return FAMILY_DEFAULTS.get(family or "", PRESETS[DEFAULT_PRESET])


def dict_field(key: Any) -> str | None:
    """The settings field a flat-dict key names (`"lambda"` -> `"flux_lambda"`), or None."""
    return _canonical_key(key)


def matching_preset(settings: VSFSettings) -> str:
    """The preset whose numbers equal `settings` (ignoring start/end/lambda), else `Custom`."""
    for name, preset in PRESETS.items():
        if (preset.method, preset.alpha, preset.beta) == (settings.method, settings.alpha, settings.beta) and (
            settings.method != "nag" or preset.tau == settings.tau
        ):
            return name
    return CUSTOM_PRESET


# -- validation -------------------------------------------------------------------------------------
# One range per number for every entry point (UI sliders, HTTP API, XYZ, CLI, diffusers), so any value
# an image was made with can be shown by the UI's sliders when its infotext is pasted. Wide enough for
# every published setting (NAG Strong phi 11, Flux lambda 8); beyond them nothing useful happens (VSF's
# bias e^-10 already removes the negative; NAG's blend is capped at 1 separately).
ALPHA_MAX = 20.0
BETA_MAX = 10.0
LAMBDA_MAX = 20.0
RANGES = {"alpha": (0.0, ALPHA_MAX), "beta": (0.0, BETA_MAX), "flux_lambda": (0.0, LAMBDA_MAX),
          "start": (0.0, 1.0), "end": (0.0, 1.0)}


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VSFSettingsError(f"VSF {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise VSFSettingsError(f"VSF {name} must be a finite number, got {value!r}")
    return value


def _in_range(name: str, value: Any, low: float, high: float) -> float:
    value = _finite(name, value)
    if not low <= value <= high:
        raise VSFSettingsError(f"VSF {name} must be between {low:g} and {high:g}, got {value:g}")
    return value


def _validate(s: VSFSettings) -> None:
    set_ = object.__setattr__  # frozen dataclass: normalise in place once, here
    if not isinstance(s.method, str) or s.method.strip().lower() not in METHODS:
        raise VSFSettingsError(f"unknown VSF method {s.method!r}; choose one of: {', '.join(METHODS)}")
    set_(s, "method", s.method.strip().lower())
    set_(s, "alpha", _in_range("alpha", s.alpha, *RANGES["alpha"]))
    set_(s, "beta", _in_range("beta", s.beta, *RANGES["beta"]))
    set_(s, "tau", _in_range("tau", s.tau, 1e-6, 1e6))
    set_(s, "flux_lambda", _in_range("lambda", s.flux_lambda, *RANGES["flux_lambda"]))
    set_(s, "start", _in_range("start", s.start, *RANGES["start"]))
    set_(s, "end", _in_range("end", s.end, *RANGES["end"]))
    if s.start >= s.end:
        raise VSFSettingsError(f"VSF start ({s.start:g}) must be smaller than end ({s.end:g})")
    if s.method == "nag" and s.beta > 1.0:
        raise VSFSettingsError(f"NAG blend (beta) must be between 0 and 1, got {s.beta:g}")
    if s.alpha_schedule is not None:
        values = s.alpha_schedule
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise VSFSettingsError(f"VSF alpha schedule must be a list of numbers, got {values!r}")
        values = tuple(_in_range("alpha schedule value", v, 0.0, ALPHA_MAX) for v in values)
        set_(s, "alpha_schedule", values or None)


# -- keys, coercion, infotext parsing ---------------------------------------------------------------
INFOTEXT_FIELDS = ("method", "alpha", "beta", "tau", "flux_lambda", "start", "end")
INFOTEXT_KEYS = {
    "method": "VSF method",
    "alpha": "VSF alpha",
    "beta": "VSF beta",
    "tau": "VSF tau",
    "flux_lambda": "VSF lambda",
    "start": "VSF start",
    "end": "VSF end",
    "alpha_schedule": "VSF alpha schedule",
}
# Accepted spellings in a flat dict (API object, CLI, JSON) -> field name.
_DICT_ALIASES = {
    "method": "method",
    "alpha": "alpha",
    "beta": "beta",
    "tau": "tau",
    "lambda": "flux_lambda",
    "flux_lambda": "flux_lambda",
    "start": "start",
    "end": "end",
    "alpha_schedule": "alpha_schedule",
    "preset": "preset",
    "enabled": "enabled",
}
DICT_KEYS = tuple(_DICT_ALIASES)


def _canonical_key(key: Any) -> str | None:
    return _DICT_ALIASES.get(str(key).strip().lower()) if isinstance(key, str) else None


def _coerce(name: str, value: Any) -> Any:
    """Strings from infotext / query strings to numbers; anything else is left to validation."""
    if name == "method":
        if isinstance(value, str):
            return value.strip().lower()
        return value
    if name == "alpha_schedule":
        if value is None:
            return None
        if isinstance(value, str):
            value = [v for v in re.split(r"[\s,;]+", value.strip()) if v]
        if isinstance(value, Iterable):
            return tuple(_coerce("alpha", v) for v in value)
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise VSFSettingsError(f"VSF {name} must be a number, got {value!r}") from None
    return value


def _format_value(value: Any) -> str:
    """Numbers as the shortest text that reads back as the same float (`repr`), whole numbers without
    `.0`: 3.3 -> "3.3", 1.0 -> "1", 1.23456789 -> "1.23456789" (never rounded)."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def _quote(value: str) -> str:
    if any(c in value for c in ',:"') or value != value.strip():
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


_INFOTEXT_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Parse the `Key: value, Key: "quoted, value"` parameter line of a WebUI infotext.
    Only the last line holds parameters in a full infotext; earlier lines are prompts."""
    line = text.strip().splitlines()[-1] if text.strip() else ""
    out: dict[str, str] = {}
    for key, value in _INFOTEXT_PAIR.findall(line):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[key.strip()] = value
    return out


_register_presets()
_register_family_defaults()
