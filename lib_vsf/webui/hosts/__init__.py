"""Registry of host adapters and model detection.

Every module in this package (except `base`) is imported on first use and each `HostAdapter`
subclass it defines with a non-empty `name` is registered, ordered by `priority` (lower first) then
name: a new host x family adapter is one new file, no edit here. A module that fails to import (host
too old/new) is skipped and remembered in `LOAD_ERRORS`. `find_adapter(sd_model)` returns an instance of
the first adapter whose `matches()` is true, or None (the runner then shows one warning and leaves
the generation untouched).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from .base import HostAdapter

ADAPTERS: list[type[HostAdapter]] = []

LOAD_ERRORS: dict[str, str] = {}
_loaded = False


def register(cls: type[HostAdapter]) -> type[HostAdapter]:
    """Add an adapter class (usable as a decorator); registering twice is a no-op."""
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
    return cls


def load_adapters() -> list[type[HostAdapter]]:
    """Import every adapter module of this package once and register its adapter classes."""
    global _loaded
    if not _loaded:
        _loaded = True
        for info in pkgutil.iter_modules(__path__):
            if info.name == "base" or info.name.startswith("_"):
                continue
            try:
                module = importlib.import_module(f"{__name__}.{info.name}")
            except Exception as exc:  # noqa: BLE001 - one broken adapter must not hide the others
                LOAD_ERRORS[info.name] = f"{type(exc).__name__}: {exc}"
                continue
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, HostAdapter) and obj is not HostAdapter and obj.name and obj.__module__ == module.__name__:
                    register(obj)
        ADAPTERS.sort(key=lambda cls: (getattr(cls, "priority", 100), cls.name))
    return ADAPTERS


def find_adapter(sd_model: Any) -> HostAdapter | None:
    """The adapter for `sd_model`, or None when no adapter supports it."""
    for cls in load_adapters():
        try:
            if cls.matches(sd_model):
                return cls(sd_model)
        except Exception:  # a foreign model must never break detection
            continue
    return None


def describe_model(sd_model: Any) -> str:
    """A short name for messages: the model class and the diffusion model class when known."""
    inner = getattr(getattr(getattr(sd_model, "forge_objects", None), "unet", None), "model", None)
    inner = getattr(inner, "diffusion_model", None) or getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    parts = [type(sd_model).__name__]
    if inner is not None:
        parts.append(type(inner).__name__)
    return "/".join(parts)
