"""The script's arguments: what `ui()` returns, what the HTTP API sends, turned into settings.

The UI's components arrive in `UI_ARGS` order. Through `/sdapi/v1/txt2img` and `img2img`,
`alwayson_scripts["Value Sign Flip"]["args"]` is copied into those slots verbatim, so two forms arrive:

- the positional list, `[enabled, method, preset, alpha, beta, lambda, start, end, single_pass, show_map,
  negative_image]` (missing trailing values keep the UI defaults), where the numbers are what the sliders hold and a
  named preset is informational (the UI's preset already filled the sliders); with the preset
  `Model default` (the UI's default) method, alpha, beta and lambda come from the model instead,
  except those that differ from their UI defaults;
- one object in slot 0, `{"enabled", "method", "preset", "alpha", "beta", "lambda", "start", "end",
  "single_pass", "show_map", "tau", "negative_image"}`, every key optional: the preset is applied first and
  explicit numbers override it, no preset meaning `Model default`; `enabled` defaults to true (sending the
  object asks for VSF).

`negative_image` (Flux Kontext, Qwen-Image-Edit on Forge Neo; docs/negative-images.md) is the UI's PIL
image or, through the API, a base64 string of an image file as the host's own `init_images` take it
(with or without a `data:image/...;base64,` prefix); `None`/empty means none.

`Model default` is the model family's VSF default (`settings.model_default`: SD3 3.5/0.1, Flux 6/0.2
with lambda 8, Wan 1.7/0.2, SD1.5/SDXL 3.3/0.2; NAG and NASA their presets), as in the CLI and the
diffusers integration. The family is known only when sampling starts, so `ScriptArgs.model_default`
keeps the explicit fields and `for_family` resolves them; until then `settings` holds them over
VSF Quality, which validates every explicit value already.

Both give a `ScriptArgs` or raise `VSFSettingsError` with a message for the user.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..settings import (CUSTOM_PRESET, DEFAULT_PRESET, METHOD_LABELS, MODEL_DEFAULT_PRESET, PRESETS, VSFSettings,
                        VSFSettingsError, dict_field, from_preset, matching_preset, model_default)

SCRIPT_TITLE = "Value Sign Flip"  # the script's title: its key in the API's `alwayson_scripts`
UI_ARGS = ("enabled", "method", "preset", "alpha", "beta", "lambda", "start", "end", "single_pass", "show_map",
           "negative_image")
API_KEYS = ("enabled", "method", "preset", "alpha", "beta", "lambda", "start", "end", "single_pass", "show_map", "tau",
            "negative_image")

DEFAULT_SETTINGS = PRESETS[DEFAULT_PRESET]
UI_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "method": METHOD_LABELS[DEFAULT_SETTINGS.method],
    "preset": MODEL_DEFAULT_PRESET,
    "alpha": DEFAULT_SETTINGS.alpha,
    "beta": DEFAULT_SETTINGS.beta,
    "lambda": DEFAULT_SETTINGS.flux_lambda,
    "start": DEFAULT_SETTINGS.start,
    "end": DEFAULT_SETTINGS.end,
    "single_pass": True,
    "show_map": False,  # "Show where the negative acts": one extra map image per output (VSF only)
    "negative_image": None,  # Flux Kontext / Qwen-Image-Edit on Forge Neo: a picture to move away from
}
PRESET_CHOICES = [MODEL_DEFAULT_PRESET, *PRESETS, CUSTOM_PRESET]  # the UI's preset dropdown
_UI_DEFAULT_FIELDS = {"method": DEFAULT_SETTINGS.method, "alpha": DEFAULT_SETTINGS.alpha,
                      "beta": DEFAULT_SETTINGS.beta, "flux_lambda": DEFAULT_SETTINGS.flux_lambda}
# Fields that keep the label `Model default` when given explicitly (the step window is not the model's).
_KEEPS_MODEL_DEFAULT = {"start", "end"}


@dataclass(frozen=True)
class ScriptArgs:
    """Parsed script arguments: whether VSF runs, with which settings, whether CFG is replaced, and
    whether to show where the negative acts (`show_map`: a map image per output; it never changes the
    image, so it is no generation parameter and not written into the infotext); `negative_image`: a
    PIL RGB image to move away from (edit models, docs/negative-images.md) or None."""

    enabled: bool
    settings: VSFSettings
    single_pass: bool = True
    preset: str = DEFAULT_PRESET
    # No preset named: the explicitly given fields, to apply over the model's default (`for_family`).
    model_default: tuple[tuple[str, Any], ...] | None = None
    show_map: bool = False
    negative_image: Any = None

    @classmethod
    def over_model_default(cls, enabled: bool, explicit: Mapping[str, Any], single_pass: bool,
                           show_map: bool = False, negative_image: Any = None) -> "ScriptArgs":
        """Arguments that name no preset: `explicit` fields (settings field names) over the model's default."""
        settings = model_default(None, explicit.get("method", "vsf")).replace(**explicit)  # validates them
        label = MODEL_DEFAULT_PRESET if set(explicit) <= _KEEPS_MODEL_DEFAULT else CUSTOM_PRESET
        return cls(enabled, settings, single_pass, label, tuple(explicit.items()), show_map, negative_image)

    def for_family(self, family: str | None) -> "ScriptArgs":
        """These arguments for a model of `family` (`sd3`, `flux`, `wan`, `unet`): the final settings."""
        if self.model_default is None:
            return self
        explicit = dict(self.model_default)
        settings = model_default(family, explicit.get("method", "vsf")).replace(**explicit)
        return dataclasses.replace(self, settings=settings, model_default=None)

    def values(self) -> list[Any]:
        """The positional list (UI order) that parses back to these (final or `Model default`) arguments."""
        s = self.settings
        return [self.enabled, METHOD_LABELS[s.method], self.preset, s.alpha, s.beta, s.flux_lambda,
                s.start, s.end, self.single_pass, self.show_map, self.negative_image]


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
    if value.strip().lower() == MODEL_DEFAULT_PRESET.lower():
        return MODEL_DEFAULT_PRESET
    for name in PRESETS:
        if name.lower() == value.strip().lower():
            return name
    raise VSFSettingsError(f"unknown VSF preset {value!r}; choose one of: {', '.join(PRESET_CHOICES)}")


def negative_image(value: Any) -> Any:
    """The negative image slot: None / "" (none), a PIL image (the UI's `gr.Image(type="pil")`), or, as
    the host's own image arguments (`init_images`), a base64 string of an image file with or without a
    `data:image/...;base64,` prefix. Returns a PIL RGB image or None; anything unreadable is refused."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if not isinstance(value, str):
        raise VSFSettingsError(f"VSF negative image must be a base64-encoded image, got {type(value).__name__}")
    import base64
    import binascii
    import io

    text = value.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise VSFSettingsError("VSF negative image: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (binascii.Error, ValueError) as exc:
        raise VSFSettingsError(f"VSF negative image is not valid base64 ({exc})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise VSFSettingsError(f"VSF negative image could not be read as an image ({exc})") from None


def negative_image_hash(image: Any) -> str:
    """First 10 hex digits of the SHA-256 of the PNG encoding of the (RGB) image: what the infotext records."""
    import hashlib
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:10]


def parse_script_args(args: Sequence[Any]) -> ScriptArgs:
    """`ScriptArgs` from the script's slot values (positional list or one object in slot 0)."""
    args = list(args or [])
    if args and isinstance(args[0], Mapping):
        return parse_api_object(args[0])
    if len(args) > len(UI_ARGS):
        raise VSFSettingsError(f"VSF takes at most {len(UI_ARGS)} arguments ({', '.join(UI_ARGS)}), got {len(args)}")
    values = dict(UI_DEFAULTS)
    values.update({k: v for k, v in zip(UI_ARGS, args) if v is not None})
    show_map = as_bool("show map", values["show_map"])
    image = negative_image(values["negative_image"])
    method = method_key(values["method"])
    preset = preset_name(values["preset"])
    if preset == MODEL_DEFAULT_PRESET:
        # The model decides method and numbers, except those moved off their UI defaults (the UI shows
        # `Custom` then; an API list may not have said so); the step window is always the list's.
        moved = {field: method if name == "method" else values[name]
                 for name, field in (("method", "method"), ("alpha", "alpha"), ("beta", "beta"),
                                     ("lambda", "flux_lambda"))
                 if (method if name == "method" else values[name]) != _UI_DEFAULT_FIELDS[field]}
        return ScriptArgs.over_model_default(as_bool("enabled", values["enabled"]),
                                             {**moved, "start": values["start"], "end": values["end"]},
                                             as_bool("single pass", values["single_pass"]), show_map, image)
    # NAG's tau has no slider: it comes from the named preset when that preset is a NAG one.
    tau = PRESETS[preset].tau if preset != CUSTOM_PRESET and PRESETS[preset].method == method else DEFAULT_SETTINGS.tau
    settings = DEFAULT_SETTINGS.replace(method=method, alpha=values["alpha"], beta=values["beta"], tau=tau,
                                        flux_lambda=values["lambda"], start=values["start"], end=values["end"])
    if preset != CUSTOM_PRESET and matching_preset(settings) != preset:
        preset = CUSTOM_PRESET  # the sliders were moved away from the preset's numbers
    return ScriptArgs(as_bool("enabled", values["enabled"]), settings, as_bool("single pass", values["single_pass"]),
                      preset, show_map=show_map, negative_image=image)


def parse_api_object(data: Mapping[str, Any]) -> ScriptArgs:
    """`ScriptArgs` from the API's single-object form (see the module docstring)."""
    unknown = [k for k in data if not isinstance(k, str) or k.strip().lower() not in API_KEYS + ("flux_lambda",)]
    if unknown:
        raise VSFSettingsError(f"unknown VSF key(s): {', '.join(map(str, unknown))}; known: {', '.join(API_KEYS)}")
    data = {k.strip().lower(): v for k, v in data.items()}
    enabled = as_bool("enabled", data.get("enabled", True))
    single_pass = as_bool("single pass", data.get("single_pass", UI_DEFAULTS["single_pass"]))
    show_map = as_bool("show map", data.get("show_map", UI_DEFAULTS["show_map"]))
    image = negative_image(data.get("negative_image"))
    preset = preset_name(data.get("preset", MODEL_DEFAULT_PRESET))
    fields = {k: v for k, v in data.items()
              if k not in ("enabled", "single_pass", "show_map", "preset", "negative_image")}
    if "method" in fields:
        fields["method"] = method_key(fields["method"])
    if preset == MODEL_DEFAULT_PRESET:
        checked = VSFSettings.from_dict(fields, base=model_default(None, fields.get("method", "vsf")))
        explicit = {dict_field(k): getattr(checked, dict_field(k)) for k in fields}
        return ScriptArgs.over_model_default(enabled, explicit, single_pass, show_map, image)
    settings = DEFAULT_SETTINGS if preset == CUSTOM_PRESET else from_preset(preset)
    settings = VSFSettings.from_dict(fields, base=settings)
    if preset != CUSTOM_PRESET and matching_preset(settings) != preset:
        preset = CUSTOM_PRESET  # explicit numbers overrode the preset's
    return ScriptArgs(enabled, settings, single_pass, preset, show_map=show_map, negative_image=image)
