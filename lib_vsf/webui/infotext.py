"""VSF parameters in the PNG infotext and back into the UI.

Written (`write`) into `p.extra_generation_params` only when guidance actually ran, as
`VSF method: vsf, VSF alpha: 3.3, VSF beta: 0.2, VSF tau: 2.5, VSF lambda: 0, VSF start: 0, VSF end: 1,
VSF preset: VSF Quality, VSF single pass: True` (and `VSF negative image: <10 hex digits of the SHA-256 of
its PNG>` when one was used); notes (`write_notes`) as `VSF note: "..."`, written
also when guidance did not run (then alone, without settings). Read back (`paste_fields`) through the
script's `infotext_fields`: each entry maps one UI component to a function of the parsed infotext dict that
returns the component's value, or None to leave it alone (the host then sends no update).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from ..settings import CUSTOM_PRESET, METHOD_LABELS, INFOTEXT_KEYS, VSFSettings, VSFSettingsError, matching_preset
from .args import ScriptArgs, negative_image_hash

PRESET_KEY = "VSF preset"
SINGLE_PASS_KEY = "VSF single pass"
# The generation's notes (unsupported model, empty negative, backend): the API's `info` has no comments
# field, so this is how API users see them. Informational only: paste and `read` ignore it.
NOTE_KEY = "VSF note"
# A negative image (edit models) is recorded by a hash of its PNG encoding, never the image: it cannot be
# pasted back (paste leaves the UI's image as it is), but two infotexts tell whether the same one was used.
NEGATIVE_IMAGE_KEY = "VSF negative image"


def infotext_params(args: ScriptArgs) -> dict[str, Any]:
    """The infotext entries for a guided generation."""
    out: dict[str, Any] = dict(args.settings.to_infotext())
    out[PRESET_KEY] = args.preset
    out[SINGLE_PASS_KEY] = bool(args.single_pass)
    if args.negative_image is not None:
        out[NEGATIVE_IMAGE_KEY] = negative_image_hash(args.negative_image)
    return out


def write(p: Any, args: ScriptArgs) -> None:
    """Record the settings on `p` so that every image of the generation carries them."""
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        # A fresh dict, never an update in place: X/Y/Z cells are shallow copies of one `p` sharing this
        # dict, so an in-place write would leave VSF keys on later cells that run without VSF.
        p.extra_generation_params = {**params, **infotext_params(args)}


def write_notes(p: Any, notes: list[str]) -> None:
    """Record the generation's notes under `NOTE_KEY` (a fresh dict, as `write`)."""
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict) and notes:
        p.extra_generation_params = {**params, NOTE_KEY: " / ".join(notes)}


def read(params: Mapping[str, Any]) -> ScriptArgs | None:
    """`ScriptArgs` from a parsed infotext dict, or None when it holds no (valid) VSF entries."""
    if INFOTEXT_KEYS["method"] not in params:
        return None
    try:
        settings = VSFSettings.from_infotext(params)
    except VSFSettingsError:
        return None
    preset = str(params.get(PRESET_KEY) or matching_preset(settings))
    single = str(params.get(SINGLE_PASS_KEY, "True")).strip().lower() not in ("false", "0", "no")
    return ScriptArgs(True, settings, single, preset)


def paste_fields() -> list[tuple[str, Callable[[Mapping[str, Any]], Any]]]:
    """`(arg name, getter)` pairs in UI order; a getter returns None when the infotext has no VSF."""

    def getter(extract: Callable[[ScriptArgs], Any]) -> Callable[[Mapping[str, Any]], Any]:
        def get(params: Mapping[str, Any]) -> Any:
            args = read(params)
            return None if args is None else extract(args)
        return get

    def enabled(params: Mapping[str, Any]) -> bool:
        # An infotext without VSF switches the accordion off, as the host does for its own options.
        return read(params) is not None

    def preset(args: ScriptArgs) -> str:
        # An infotext holds the numbers the image was made with: `Model default` (resolved for the model
        # that made it) pastes as the preset those numbers match, or `Custom`, so the sliders are used.
        from ..settings import PRESETS
        if args.preset in PRESETS or args.preset == CUSTOM_PRESET:
            return args.preset
        return matching_preset(args.settings)

    return [
        ("enabled", enabled),
        ("method", getter(lambda a: METHOD_LABELS[a.settings.method])),
        ("preset", getter(preset)),
        ("alpha", getter(lambda a: a.settings.alpha)),
        ("beta", getter(lambda a: a.settings.beta)),
        ("lambda", getter(lambda a: a.settings.flux_lambda)),
        ("start", getter(lambda a: a.settings.start)),
        ("end", getter(lambda a: a.settings.end)),
        ("single_pass", getter(lambda a: a.single_pass)),
    ]
