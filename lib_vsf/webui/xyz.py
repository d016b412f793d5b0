"""X/Y/Z plot axes: `[VSF] Method`, `Preset`, `Alpha`, `Beta`, `Lambda`, `Start`, `End`.

`register_axes()` runs from an `on_before_ui` callback: it finds the host's loaded `xyz_grid.py`
module and appends one `AxisOption` per axis, once (labels already present are skipped, so a reload
or a second call adds nothing). Each axis stores its value on the cell's `p` in a fresh dict
(`p.vsf_xyz`; XYZ cells are shallow copies of one `p`, so the dict is replaced, never mutated), and
the runner applies those overrides on top of the script's arguments: preset first, then method and
numbers. A VSF axis turns VSF on for its cells (a grid over `[VSF] Alpha` with the accordion closed
still compares alphas); `[VSF] Method: Off` turns it off, for with/without comparisons. Each axis's
`confirm` checks the cells it can see against their real settings before the grid runs (`make_confirm`).
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Mapping

from ..settings import (CUSTOM_PRESET, METHOD_LABELS, MODEL_DEFAULT_PRESET, PRESETS, VSFSettingsError, from_preset,
                        matching_preset)
from .args import SCRIPT_TITLE, ScriptArgs, method_key, parse_script_args, preset_name

log = logging.getLogger("vsf")

OVERRIDES_ATTR = "vsf_xyz"
CONFIRMED_ATTR = "vsf_xyz_confirmed"  # on the grid's `p`: [(field, values)] of the VSF axes confirmed so far
OFF = "Off"
NUMBER_FIELDS = ("alpha", "beta", "flux_lambda", "start", "end")
# (label, field, value type)
AXES: tuple[tuple[str, str, type], ...] = (
    ("[VSF] Method", "method", str),
    ("[VSF] Preset", "preset", str),
    ("[VSF] Alpha", "alpha", float),
    ("[VSF] Beta", "beta", float),
    ("[VSF] Lambda", "flux_lambda", float),
    ("[VSF] Start", "start", float),
    ("[VSF] End", "end", float),
)
LABELS = {field: label for label, field, _kind in AXES}


def method_choices() -> list[str]:
    """Values offered by the `[VSF] Method` axis."""
    return [*METHOD_LABELS.values(), OFF]


def preset_choices() -> list[str]:
    """Values offered by the `[VSF] Preset` axis."""
    return [MODEL_DEFAULT_PRESET, *PRESETS]


def make_apply(field: str) -> Callable[[Any, Any, Any], None]:
    """The XYZ `apply(p, value, values)` of one axis: store `value` in the cell's override dict."""

    def apply(p: Any, value: Any, _values: Any) -> None:
        overrides = dict(getattr(p, OVERRIDES_ATTR, None) or {})
        overrides[field] = value
        setattr(p, OVERRIDES_ATTR, overrides)

    apply.__name__ = f"apply_vsf_{field}"
    return apply


def make_confirm(field: str) -> Callable[[Any, list], None]:
    """Validate an axis before the grid runs, against the settings its cells will really have.

    The host's X/Y/Z script calls `confirm(p, values)` once per axis, X then Y then Z, with the grid's
    own `p` (whose `script_args` hold this script's UI/API arguments) before any cell runs; a cell's
    own error would only blank that cell (the script catches it). So each confirm checks every cell
    combination of the script's arguments with this axis and the VSF axes confirmed before it (kept on
    `p`): the last VSF axis sees them all. A bad combination raises `VSFSettingsError` naming the cell;
    the host reports it as it reports its own axes' errors (the HTTP API answers 500, see README)."""

    def confirm(p: Any, values: list) -> None:
        base = script_args_of(p)
        axes = [*(getattr(p, CONFIRMED_ATTR, None) or []), (field, list(values))]
        if p is not None:
            setattr(p, CONFIRMED_ATTR, axes)  # a fresh list: cells copied from `p` never share it
        for combination in itertools.product(*(axis_values for _, axis_values in axes)):
            overrides = dict(zip((axis_field for axis_field, _ in axes), combination))
            try:
                apply_overrides(base, overrides)
            except VSFSettingsError as exc:
                cell = ", ".join(f"{LABELS[k]}: {v}" for k, v in overrides.items())
                raise VSFSettingsError(f"Value Sign Flip, X/Y/Z cell {cell}: {exc}") from None

    return confirm


def script_args_of(p: Any) -> ScriptArgs:
    """This script's arguments as the grid's cells will receive them: its slots of `p.script_args`
    (found through `p.scripts.alwayson_scripts` by title), or the UI defaults when `p` has none."""
    runner = getattr(p, "scripts", None)
    script_args = getattr(p, "script_args", None)
    for script in getattr(runner, "alwayson_scripts", None) or []:
        try:
            title = script.title()
        except Exception:  # noqa: BLE001 - another extension's script; not ours
            continue
        if title == SCRIPT_TITLE and script_args is not None and script.args_from is not None:
            try:
                return parse_script_args(list(script_args)[script.args_from:script.args_to])
            except VSFSettingsError as exc:
                raise VSFSettingsError(f"Value Sign Flip: {exc}") from None
    return parse_script_args([])


def apply_overrides(args: ScriptArgs, overrides: Mapping[str, Any] | None) -> ScriptArgs:
    """`args` with the XYZ overrides of one cell applied (raises VSFSettingsError on a bad value): a
    named preset replaces method and numbers (keeping start, end and lambda), `Model default` leaves
    them to the model (keeping start and end), then method and numbers override."""
    if not overrides:
        return args
    settings, preset, enabled = args.settings, args.preset, True
    explicit = dict(args.model_default) if args.model_default is not None else None
    if "preset" in overrides:
        preset = preset_name(overrides["preset"])
        if preset == MODEL_DEFAULT_PRESET:
            explicit = {"start": settings.start, "end": settings.end}
        elif preset != CUSTOM_PRESET:
            settings = from_preset(preset).replace(start=settings.start, end=settings.end,
                                                   flux_lambda=settings.flux_lambda)
            explicit = None
    changes: dict[str, Any] = {}
    if "method" in overrides:
        if str(overrides["method"]).strip().lower() == OFF.lower():
            enabled = False
        else:
            changes["method"] = method_key(overrides["method"])
    for key, value in overrides.items():
        if key in NUMBER_FIELDS:
            try:
                changes[key] = float(value)
            except (TypeError, ValueError):
                raise VSFSettingsError(f"{LABELS[key]} value is not a number: {value!r}") from None
    if explicit is not None:  # range errors keep their own message, here and below
        return ScriptArgs.over_model_default(enabled, {**explicit, **changes}, args.single_pass, args.show_map,
                                             args.negative_image)
    settings = settings.replace(**changes)
    if matching_preset(settings) != preset:
        preset = matching_preset(settings)
    return ScriptArgs(enabled, settings, args.single_pass, preset, show_map=args.show_map,
                      negative_image=args.negative_image)


def find_xyz_module(scripts_data: list) -> Any | None:
    """The loaded `xyz_grid.py` module among the host's `scripts.scripts_data`, or None."""
    for entry in scripts_data:
        cls = getattr(entry, "script_class", None)
        if cls is not None and getattr(cls, "__module__", "") == "xyz_grid.py":
            return getattr(entry, "module", None)
    return None


def register_axes(*_args: Any, scripts_module: Any = None) -> int:
    """Append the VSF axes to the host's XYZ plot; returns how many were added (0 when already there
    or when the host has no XYZ script)."""
    if scripts_module is None:
        try:
            from modules import scripts as scripts_module  # type: ignore[import-not-found,no-redef]
        except Exception:  # noqa: BLE001 - not on a host
            return 0
    xyz = find_xyz_module(getattr(scripts_module, "scripts_data", []))
    if xyz is None or not hasattr(xyz, "AxisOption") or not hasattr(xyz, "axis_options"):
        log.info("[VSF] no X/Y/Z plot script found; VSF axes not registered")
        return 0
    present = {getattr(option, "label", None) for option in xyz.axis_options}
    added = 0
    for label, field, kind in AXES:
        if label in present:
            continue
        kwargs: dict[str, Any] = {"confirm": make_confirm(field)}
        if field == "method":
            kwargs["choices"] = method_choices
        elif field == "preset":
            kwargs["choices"] = preset_choices
        xyz.axis_options.append(xyz.AxisOption(label, kind, make_apply(field), **kwargs))
        added += 1
    return added
