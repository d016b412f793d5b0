"""Replace named attributes (module-level attention functions, model methods) and put them back.

Host patches must check what they replace before replacing it (a host update that renamed or
re-signed a function must give a clear refusal, not a crash mid-generation), replace everything or
nothing, and restore exactly on every exit path. `AttributePatch` does that bookkeeping.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

_MISSING = object()


class PatchError(RuntimeError):
    """What we were about to patch is not what we expect (host changed); nothing was patched."""


def check_callable(owner: Any, name: str, required_params: Iterable[str] = ()) -> Callable:
    """Return `owner.name` if it is a callable accepting `required_params` (by name), else raise
    PatchError naming what differs."""
    target = getattr(owner, name, _MISSING)
    where = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"
    if target is _MISSING:
        raise PatchError(f"{where} does not exist (host version not supported)")
    if not callable(target):
        raise PatchError(f"{where} is not callable (host version not supported)")
    required = list(required_params)
    if required:
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return target  # builtins without a signature: accept, the call itself will tell
        accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        missing = [p for p in required if p not in params and not accepts_kwargs]
        if missing:
            raise PatchError(f"{where} has no parameter(s) {', '.join(missing)} (host version not supported)")
    return target


class AttributePatch:
    """Collects attribute replacements; `restore()` undoes all of them in reverse order, once.

    Use as a context manager, or call `apply()` / `restore()` in a try/finally. `apply` replaces
    every registered attribute or, if any check fails, none.
    """

    def __init__(self):
        self._planned: list[tuple[Any, str, Any]] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def add(self, owner: Any, name: str, replacement: Any) -> "AttributePatch":
        self._planned.append((owner, name, replacement))
        return self

    @property
    def applied(self) -> bool:
        return bool(self._saved)

    def apply(self) -> "AttributePatch":
        if self._saved:
            raise RuntimeError("patch already applied")
        try:
            for owner, name, replacement in self._planned:
                # Keep the instance dict entry distinct from a class attribute so restore is exact.
                had_own = name in getattr(owner, "__dict__", {})
                self._saved.append((owner, name, owner.__dict__[name] if had_own else _MISSING))
                setattr(owner, name, replacement)
        except Exception:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            if original is _MISSING:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, original)

    def __enter__(self):
        return self.apply()

    def __exit__(self, *exc):
        self.restore()
        return False
