"""lib_vsf: Value Sign Flip negative-prompt guidance for few-step diffusion models (host-free core).

Public pieces:
- `VSFSettings`, `VSFSettingsError`, `from_preset`, `PRESETS` — validated settings (settings.py)
- `joint_attention`, `cross_attention`, `Guidance` — the attention math (attention.py)
- `TokenLayout` — token roles in an attention sequence (layout.py)
- `lib_vsf.diffusers` — use with a diffusers pipeline (`VSFGuidance`)
"""
from .settings import (  # noqa: F401
    PRESETS,
    VSFSettings,
    VSFSettingsError,
    family_default,
    from_preset,
    preset_names,
)

__version__ = "0.1.0"
