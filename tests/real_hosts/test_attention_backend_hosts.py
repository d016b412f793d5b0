"""The host's attention choice, read from the real host modules (lib_vsf/webui/attention_backend.py).

Forge Neo and Forge pick `backend.attention.attention_function` at import from their command line;
reForge picks `ldm_patched.ldm.modules.attention.optimized_attention`. The glue maps the function's
own name, so the names it knows must be the host's: Neo on CPU runs `--use-pytorch-cross-attention`
(`vsf_host_setup.HOSTS`), which must read as "sdpa", and Neo defines all four functions it maps.
"""
from __future__ import annotations

import pytest

from lib_vsf.webui.attention_backend import HOST_FUNCTIONS, host_attention_backend
from vsf_host_setup import host_modules, import_host

EXPECTED_ON_CPU = {"neo": "sdpa", "reforge": "sdpa"}  # Forge on CPU picks sub-quadratic attention: None


@pytest.mark.parametrize("host,module,attribute", [("neo", "backend.attention", "attention_function"),
                                                   ("forge", "backend.attention", "attention_function"),
                                                   ("reforge", "ldm_patched.ldm.modules.attention", "optimized_attention")])
def test_real_host_attention_function_is_read(host, module, attribute):
    with host_modules(host):
        mod = import_host(module)
        chosen = getattr(mod, attribute).__name__
        if host == "neo":
            assert set(HOST_FUNCTIONS) <= set(vars(mod)), set(HOST_FUNCTIONS) - set(vars(mod))
        assert host_attention_backend() == HOST_FUNCTIONS.get(chosen) == EXPECTED_ON_CPU.get(host), chosen
