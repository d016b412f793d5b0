"""A tiny text-to-image model the project trains itself (no download), its analytic judge and a mini
NegGenBench: `data` (synthetic scenes and captions), `model` (the SD3 pipeline and the bundled weights),
`train` (`python -m lib_vsf train-tiny`), `judge`, `bench` (`python -m lib_vsf bench-neg`).
Host-free; only `model`, `train` and `bench` need diffusers / transformers."""
