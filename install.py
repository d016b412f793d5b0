"""Install-time check for the WebUI extension (run by A1111/Forge in a subprocess at start-up).

Nothing is downloaded or pip-installed: VSF needs only what every supported host already ships
(torch with `scaled_dot_product_attention` taking a boolean mask and `scale=`, i.e. torch >= 2.1).
This script reports what the installed torch can do, so a user with an old or unusual build sees one
clear line at start-up instead of an error mid-generation.
"""
from __future__ import annotations


def torch_report() -> tuple[bool, str]:
    """(usable, message) for the installed torch."""
    try:
        import torch
        import torch.nn.functional as F
    except Exception as exc:  # noqa: BLE001 - the host installs torch later; say so and carry on
        return False, f"[VSF] torch is not importable yet ({exc}); VSF will check again when it runs."
    version = torch.__version__.split("+")[0]
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    if (major, minor) < (2, 1) or not hasattr(F, "scaled_dot_product_attention"):
        return False, (f"[VSF] torch {torch.__version__} is too old: Value Sign Flip needs torch >= 2.1 "
                       "(scaled_dot_product_attention with masks). The extension will stay inactive.")
    try:
        q = torch.randn(1, 1, 3, 4)
        mask = torch.tensor([[[[True, True, False]]]])
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask, scale=0.5)
    except Exception as exc:  # noqa: BLE001
        return False, f"[VSF] torch {torch.__version__} cannot run masked attention on CPU ({exc})."
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    return True, f"[VSF] torch {torch.__version__} OK for Value Sign Flip ({', '.join(devices)})."


if __name__ == "__main__" or __name__.startswith("install"):
    print(torch_report()[1])
