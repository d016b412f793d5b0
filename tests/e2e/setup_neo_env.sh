#!/usr/bin/env bash
# Set up a Forge Neo checkout + virtual environment for the opt-in end-to-end tests
# (tests/e2e/test_neo_api_e2e.py, tests/e2e/test_neo_browser_e2e.py). For a developer's machine; CI must
# not run this (it downloads a few GB). Nothing it makes belongs in this repository.
#
#   tests/e2e/setup_neo_env.sh [NEO_DIR] [VENV_DIR]
#       NEO_DIR   Forge Neo checkout to create or reuse (default: ../vsf-hosts/neo-e2e next to this repo)
#       VENV_DIR  its virtual environment              (default: <NEO_DIR>-venv)
#
# Environment overrides (defaults are what was seen working on 2026-12-02, Linux x86_64, CPU only):
#   PYTHON            interpreter for the venv         (python3.11; Neo asks for 3.13 but runs on 3.11 with
#                                                     --skip-python-version-check)
#   NEO_URL           Neo git URL or local mirror      (https://github.com/nolanlane/sd-webui-forge-classic.git,
#                                                     a public copy of the Forge Neo `neo` branch)
#   NEO_COMMIT        Neo commit                       (6e1e0d5a: "Remove --xformers flag and set CUDA_VISIBLE_DEVICES to 0")
#   TORCH_PACKAGES    ("torch==2.12.1 torchvision==0.27.1": PyPI's CUDA-13 builds, which run on CPU; Neo's
#                     setuptools==69.5.1 pin rules out torch 2.14 (it needs setuptools >= 77), and a
#                     torch/torchvision pair from different builds fails with 'torchvision::nms')
#   TORCH_INDEX_URL   extra index for torch, e.g. https://download.pytorch.org/whl/cpu for CPU-only wheels
#   FAMILIES          checkpoints to build: any of "sd15 sdxl flux chroma wan zimage flux2" (default "sd15";
#                     sd15 and sdxl are about 2.1 GB each, flux/chroma/wan write full-size T5-XXL / UMT5-XXL
#                     text encoders in fp8, zimage/flux2 a full-size Qwen3-4B in fp8: 5-7 GB each)
#   SKIP_CHECKPOINT=1 build no checkpoint (the tests build the ones they need when missing)
#
# Afterwards:
#   VSF_NEO_DIR=<NEO_DIR> VSF_NEO_PYTHON=<VENV_DIR>/bin/python python -m pytest -v -s tests/e2e -k neo
set -euo pipefail

if [[ -n "${CI:-}" || -n "${GITHUB_ACTIONS:-}" ]]; then
    echo "setup_neo_env.sh: not for CI (downloads several GB); run it by hand." >&2
    exit 1
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
NEO_DIR="${1:-$(dirname "$REPO")/vsf-hosts/neo-e2e}"
VENV_DIR="${2:-${NEO_DIR%/}-venv}"
PYTHON="${PYTHON:-python3.11}"
NEO_URL="${NEO_URL:-https://github.com/nolanlane/sd-webui-forge-classic.git}"
NEO_COMMIT="${NEO_COMMIT:-6e1e0d5aba61048701d52fee2a51c746b76fdc92}"
TORCH_PACKAGES="${TORCH_PACKAGES:-torch==2.12.1 torchvision==0.27.1}"
FAMILIES="${FAMILIES:-sd15}"

case "$(realpath -m "$NEO_DIR")/" in
    "$REPO"/*) echo "NEO_DIR must be outside this repository ($REPO)" >&2; exit 1 ;;
esac

step() { printf '\n== %s\n' "$*"; }

step "Neo checkout: $NEO_DIR @ $NEO_COMMIT"
if [[ ! -d "$NEO_DIR/.git" ]]; then
    mkdir -p "$(dirname "$NEO_DIR")"
    git clone "$NEO_URL" "$NEO_DIR"
fi
git -C "$NEO_DIR" checkout -q "$NEO_COMMIT"

# Chroma's bundled tokenizer folder lacks tokenizer.json (the T5 tokenizer Flux bundles is the same one);
# without it Neo fails to load a Chroma checkpoint offline.
CHROMA_TOK="$NEO_DIR/backend/huggingface/Chroma/tokenizer"
if [[ -d "$CHROMA_TOK" && ! -f "$CHROMA_TOK/tokenizer.json" ]]; then
    cp "$NEO_DIR/backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2/tokenizer.json" "$CHROMA_TOK/"
fi

step "virtual environment: $VENV_DIR ($PYTHON)"
if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV_DIR"
fi
PY="$VENV_DIR/bin/python"

step "torch: $TORCH_PACKAGES"
# shellcheck disable=SC2086
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "$PY" -m pip install -q $TORCH_PACKAGES --extra-index-url "$TORCH_INDEX_URL"
else
    "$PY" -m pip install -q $TORCH_PACKAGES
fi

# Neo's launcher installs with `uv pip` and its requirement check ignores environment markers
# (audioop-lts is for Python >= 3.13 only): install here with pip, start it with --skip-install.
step "gradio + Neo requirements.txt (torch held at the installed build)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
grep -v -E '^torch[[:space:]]*$' "$NEO_DIR/requirements.txt" > "$WORK/requirements.txt"
"$PY" - "$WORK/constraints.txt" <<'EOF'
import sys, importlib.metadata as md
with open(sys.argv[1], "w") as f:
    for name in ("torch", "torchvision"):
        f.write(f"{name}=={md.version(name)}\n")
EOF
# Two steps, as Neo's launcher does: gradio 4.40 asks for Pillow < 11, Neo's requirements pin a newer one
# (pip reports the conflict; the UI and API work with it).
"$PY" -m pip install -q "gradio==4.40.0" "gradio_rangeslider==0.0.8" -c "$WORK/constraints.txt"
"$PY" -m pip install -q -r "$WORK/requirements.txt" -c "$WORK/constraints.txt"
# The e2e tests' own needs inside the server's python (checkpoint builders): safetensors, numpy (both
# already in Neo's requirements); sentencepiece for the T5/UMT5 tokenizers Neo builds from its bundled files.
"$PY" -m pip install -q sentencepiece -c "$WORK/constraints.txt"

step "import check (CPU)"
"$PY" - <<'EOF'
import torch, torchvision, gradio, transformers, diffusers
print("torch", torch.__version__, "torchvision", torchvision.__version__, "gradio", gradio.__version__,
      "transformers", transformers.__version__, "diffusers", diffusers.__version__)
EOF

if [[ -z "${SKIP_CHECKPOINT:-}" ]]; then
    for family in $FAMILIES; do
        step "tiny $family checkpoint"
        "$PY" "$HERE/make_tiny_neo_checkpoint.py" --neo-dir "$NEO_DIR" --family "$family"
    done
fi

step "done"
cat <<EOF
Run the end-to-end tests (they start and stop their own server on 127.0.0.1):
  VSF_NEO_DIR=$NEO_DIR VSF_NEO_PYTHON=$PY python -m pytest -v -s tests/e2e -k neo
EOF
