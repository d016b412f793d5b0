#!/usr/bin/env bash
# Set up a Forge checkout + virtual environment for the opt-in end-to-end test
# (tests/e2e/test_forge_api_e2e.py). For a developer's machine; CI must not run this (it downloads
# several GB and clones two repositories). Nothing it makes belongs in this repository.
#
#   tests/e2e/setup_forge_env.sh [FORGE_DIR] [VENV_DIR]
#       FORGE_DIR  Forge checkout to create or reuse (default: ../vsf-hosts/forge-e2e next to this repo)
#       VENV_DIR   its virtual environment          (default: <FORGE_DIR>-venv)
#
# Environment overrides (defaults are what was seen working on 2026-11-26, Linux x86_64, CPU only):
#   PYTHON            interpreter for the venv            (python3.11; Forge wants 3.10/3.11)
#   FORGE_URL         Forge git URL, or a local mirror (a path or file:// URL of a clone that holds
#                     FORGE_COMMIT)                      (https://github.com/lllyasviel/stable-diffusion-webui-forge.git)
#   FORGE_COMMIT      Forge commit                       (dfdcbab6: "Fix SD upscale Batch count (#2950)")
#   HFG_URL           huggingface_guess git URL or local mirror (https://github.com/lllyasviel/huggingface_guess.git)
#   HFG_COMMIT        the commit Forge's launch_utils.py pins (84826248...). Its HEAD (7094202) lists
#                     SD3.5 before SD3 and sends the tiny checkpoint to a config Forge does not bundle.
#   TORCH_PACKAGES    ("torch==2.12.1 torchvision==0.27.1": PyPI's CUDA-13 builds, which run on CPU;
#                     a torch/torchvision pair from different builds fails with 'torchvision::nms').
#                     Forge's setuptools==69.5.1 pin keeps torch below 2.14.
#   TORCH_INDEX_URL   extra index for torch, e.g. https://download.pytorch.org/whl/cpu for CPU-only wheels
#                     (then pick a pair that index has, e.g. TORCH_PACKAGES="torch==2.3.1 torchvision==0.18.1")
#   SKIP_CHECKPOINT=1 don't build the tiny checkpoint (the test builds it when missing)
#
# Afterwards (from the repository root, with the project's own venv; see tests/e2e/README.md):
#   VSF_FORGE_DIR=<FORGE_DIR> VSF_FORGE_PYTHON=<VENV_DIR>/bin/python python -m pytest -v -s tests/e2e/test_forge_api_e2e.py
# VSF_E2E_PORT fixes the server port, VSF_E2E_LOG_DIR the folder of the server log (forge-server.log).
set -euo pipefail

if [[ -n "${CI:-}" || -n "${GITHUB_ACTIONS:-}" ]]; then
    echo "setup_forge_env.sh: not for CI (downloads several GB); run it by hand." >&2
    exit 1
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
FORGE_DIR="${1:-$(dirname "$REPO")/vsf-hosts/forge-e2e}"
VENV_DIR="${2:-${FORGE_DIR%/}-venv}"
PYTHON="${PYTHON:-python3.11}"
FORGE_URL="${FORGE_URL:-https://github.com/lllyasviel/stable-diffusion-webui-forge.git}"
FORGE_COMMIT="${FORGE_COMMIT:-dfdcbab6}"
HFG_URL="${HFG_URL:-https://github.com/lllyasviel/huggingface_guess.git}"
HFG_COMMIT="${HFG_COMMIT:-84826248b49bb7ca754c73293299c4d4e23a548d}"
TORCH_PACKAGES="${TORCH_PACKAGES:-torch==2.12.1 torchvision==0.27.1}"

case "$(realpath -m "$FORGE_DIR")/" in
    "$REPO"/*) echo "FORGE_DIR must be outside this repository ($REPO)" >&2; exit 1 ;;
esac

step() { printf '\n== %s\n' "$*"; }

step "Forge checkout: $FORGE_DIR @ $FORGE_COMMIT"
if [[ ! -d "$FORGE_DIR/.git" ]]; then
    mkdir -p "$(dirname "$FORGE_DIR")"
    git clone "$FORGE_URL" "$FORGE_DIR"
fi
git -C "$FORGE_DIR" checkout -q "$FORGE_COMMIT"

# With --skip-prepare-environment Forge clones nothing at startup. Of the repositories
# launch_utils.prepare_environment() would clone, imports need only huggingface_guess:
# BLIP (interrogate) and stable-diffusion-webui-assets (UI fonts/assets) are not needed by the API.
step "repositories/huggingface_guess @ $HFG_COMMIT"
if [[ ! -d "$FORGE_DIR/repositories/huggingface_guess/.git" ]]; then
    git clone "$HFG_URL" "$FORGE_DIR/repositories/huggingface_guess"
fi
git -C "$FORGE_DIR/repositories/huggingface_guess" checkout -q "$HFG_COMMIT"

step "virtual environment: $VENV_DIR ($PYTHON)"
if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV_DIR"
fi
PY="$VENV_DIR/bin/python"
"$PY" -m pip install -q --upgrade pip

step "torch: $TORCH_PACKAGES"
# shellcheck disable=SC2086
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "$PY" -m pip install $TORCH_PACKAGES --extra-index-url "$TORCH_INDEX_URL"
else
    "$PY" -m pip install $TORCH_PACKAGES
fi

step "Forge requirements_versions.txt (torch held at the installed build)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
grep -v -E '^torch[[:space:]]*$' "$FORGE_DIR/requirements_versions.txt" > "$WORK/requirements.txt"
"$PY" - "$WORK/constraints.txt" <<'EOF'
import sys, importlib.metadata as md
with open(sys.argv[1], "w") as f:
    for name in ("torch", "torchvision"):
        f.write(f"{name}=={md.version(name)}\n")
EOF
"$PY" -m pip install -r "$WORK/requirements.txt" -c "$WORK/constraints.txt"

step "fix-ups"
# sentencepiece 0.2.1+ generates protobuf code that needs protobuf>=4 (runtime_version); Forge pins
# protobuf 3.20.0 and converts the T5 tokenizer through sentencepiece's pb2 -> ImportError at model load.
# joblib: the built-in soft-inpainting extension imports it (not in Forge's requirements).
"$PY" -m pip install "sentencepiece==0.2.0" joblib -c "$WORK/constraints.txt"

step "import check (CPU)"
"$PY" - <<'EOF'
import torch, torchvision, torchvision.ops, gradio, transformers, diffusers, sentencepiece, google.protobuf
from sentencepiece import sentencepiece_model_pb2  # noqa: F401  (the protobuf clash shows here)
torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)  # a mismatched torchvision fails here
print("torch", torch.__version__, "torchvision", torchvision.__version__, "gradio", gradio.__version__,
      "transformers", transformers.__version__, "diffusers", diffusers.__version__,
      "sentencepiece", sentencepiece.__version__, "protobuf", google.protobuf.__version__)
EOF

if [[ -z "${SKIP_CHECKPOINT:-}" ]]; then
    step "tiny SD3 checkpoint"
    "$PY" "$HERE/make_tiny_sd3_checkpoint.py" --forge-dir "$FORGE_DIR"
fi

step "done"
cat <<EOF
Run the end-to-end test (starts and stops its own server on 127.0.0.1):
  VSF_FORGE_DIR=$FORGE_DIR VSF_FORGE_PYTHON=$PY python -m pytest -v -s tests/e2e/test_forge_api_e2e.py
  (optional: VSF_E2E_PORT=<port>, VSF_E2E_LOG_DIR=<folder for forge-server.log>)
Or start the server by hand:
  cd $FORGE_DIR && $PY launch.py --nowebui --api --always-cpu --skip-torch-cuda-test \\
      --skip-prepare-environment --skip-python-version-check --skip-version-check \\
      --server-name 127.0.0.1 --port 7861
  (then POST {"live_previews_enable": false} to /sdapi/v1/options; use "scheduler": "Simple")
EOF
