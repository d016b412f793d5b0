#!/usr/bin/env bash
# Set up an AUTOMATIC1111 checkout, virtual environment, offline tokenizers and random-weight checkpoints
# for the opt-in end-to-end tests (tests/e2e/test_a1111_api_e2e.py, tests/e2e/test_a1111_ui_e2e.py).
# For a developer's machine; CI must not run this (it installs several GB). Nothing it makes belongs in
# this repository.
#
#   tests/e2e/setup_a1111_env.sh [A1111_DIR] [VENV_DIR]
#       A1111_DIR  checkout to create or reuse (default: ../vsf-hosts/a1111-e2e next to this repo)
#       VENV_DIR   its virtual environment     (default: <A1111_DIR>-venv)
#   Also made: <A1111_DIR>-hf (an offline Hugging Face cache: CLIP-L tokenizer + config, T5 stand-in
#   tokenizer) and three checkpoints in <A1111_DIR>/models/Stable-diffusion/ (vsf-tiny-sd15, -sdxl, -sd3).
#
# Environment overrides (defaults are what was seen working on 2026-12-02, Linux x86_64, CPU only):
#   PYTHON            interpreter for the venv (python3.11; A1111 1.10 wants 3.10, 3.11 runs with
#                     --skip-python-version-check)
#   A1111_URL         A1111 git URL, or a local mirror (path or file:// URL of a clone that holds the commit)
#                     (https://github.com/AUTOMATIC1111/stable-diffusion-webui.git)
#   A1111_COMMIT      (82a973c0, tag v1.10.1)
#   REPOS_MIRROR      a folder holding local clones named as A1111's repositories/ folder names
#                     (stable-diffusion-stability-ai, generative-models, k-diffusion,
#                     stable-diffusion-webui-assets); one it lacks, or all when unset, is cloned from the URL
#                     A1111's modules/launch_utils.py names (or STABLE_DIFFUSION_REPO, STABLE_DIFFUSION_XL_REPO,
#                     K_DIFFUSION_REPO, ASSETS_REPO, as A1111 itself reads them).
#                     Commits: always the ones launch_utils.py pins.
#   CLIP_URL          openai/CLIP git URL or local mirror (https://github.com/openai/CLIP.git); the commit is
#                     the one launch_utils.py pins (d50d76da); installed with --no-deps (k-diffusion imports it)
#   TORCH_PACKAGES    ("torch==2.14.1 torchvision==0.29.1": a same-build pair; a torchvision from another
#                     build fails with 'torchvision::nms')
#   SETUPTOOLS        replaces A1111's setuptools==69.5.1 pin (setuptools==80.9.0: torch 2.14 needs >= 77.0.3,
#                     CLIP's setup.py needs pkg_resources, gone from setuptools 81)
#   TORCH_INDEX_URL   extra index for torch (e.g. https://download.pytorch.org/whl/cpu, then pick a pair it has)
#   SKIP_CHECKPOINTS=1  don't build the checkpoints (about 5 GB, 5-10 min on 2 cores)
#
# Afterwards (from this repository's root; see tests/e2e/README.md):
#   VSF_A1111_DIR=<A1111_DIR> VSF_A1111_PYTHON=<VENV_DIR>/bin/python python -m pytest -v -s tests/e2e -k a1111
set -euo pipefail

if [[ -n "${CI:-}" || -n "${GITHUB_ACTIONS:-}" ]]; then
    echo "setup_a1111_env.sh: not for CI (installs several GB); run it by hand." >&2
    exit 1
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
A1111_DIR="$(realpath -m "${1:-$(dirname "$REPO")/vsf-hosts/a1111-e2e}")"
VENV_DIR="$(realpath -m "${2:-${A1111_DIR%/}-venv}")"
HF_DIR="${A1111_DIR%/}-hf"
PYTHON="${PYTHON:-python3.11}"
A1111_URL="${A1111_URL:-https://github.com/AUTOMATIC1111/stable-diffusion-webui.git}"
A1111_COMMIT="${A1111_COMMIT:-82a973c04367123ae98bd9abdf80d9eda9b910e2}"
CLIP_URL="${CLIP_URL:-https://github.com/openai/CLIP.git}"
TORCH_PACKAGES="${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}"
SETUPTOOLS="${SETUPTOOLS:-setuptools==80.9.0}"

case "$A1111_DIR/" in
    "$REPO"/*) echo "A1111_DIR must be outside this repository ($REPO)" >&2; exit 1 ;;
esac

step() { printf '\n== %s\n' "$*"; }

# clone_at URL DIR COMMIT [SPARSE...]: clone (once) and check out COMMIT, detached; with SPARSE patterns
# only those paths (partial mirrors of the model repositories lack the large sample images in assets/).
clone_at() {
    local url="$1" dir="$2" commit="$3"
    shift 3
    if [[ ! -d "$dir/.git" ]]; then
        mkdir -p "$(dirname "$dir")"
        git clone -q --no-checkout "$url" "$dir"
    fi
    if (( $# )); then
        git -C "$dir" config core.sparseCheckout true
        local gitdir
        gitdir="$(git -C "$dir" rev-parse --absolute-git-dir)"
        mkdir -p "$gitdir/info"
        printf '%s\n' "$@" > "$gitdir/info/sparse-checkout"
    fi
    git -c advice.detachedHead=false -C "$dir" checkout -q "$commit"
}

step "A1111 checkout: $A1111_DIR @ $A1111_COMMIT"
clone_at "$A1111_URL" "$A1111_DIR" "$A1111_COMMIT"

# launch_utils.py names each repository as  <var> = os.environ.get('<ENV>', "<value>")
pin() {
    sed -n -E "s/^ *$1 = os\.environ\.get\(['\"][A-Z_]+['\"], ['\"]([^'\"]+)['\"]\).*/\1/p" \
        "$A1111_DIR/modules/launch_utils.py" | head -n 1
}

# With --skip-prepare-environment A1111 clones nothing at startup. Of what prepare_environment() would
# clone, the server needs the three model-code repositories, the UI (not the API) also
# stable-diffusion-webui-assets (A1111 refuses to start its UI without it), and k-diffusion imports
# CLIP (below); BLIP (interrogate) is not used by the tests.
for entry in "stable_diffusion:stable-diffusion-stability-ai:STABLE_DIFFUSION_REPO" \
             "stable_diffusion_xl:generative-models:STABLE_DIFFUSION_XL_REPO" \
             "k_diffusion:k-diffusion:K_DIFFUSION_REPO" \
             "assets:stable-diffusion-webui-assets:ASSETS_REPO"; do
    IFS=: read -r var folder envname <<<"$entry"
    commit="$(pin "${var}_commit_hash")"
    if [[ -n "${REPOS_MIRROR:-}" && -d "$REPOS_MIRROR/$folder" ]]; then
        url="$REPOS_MIRROR/$folder"
    else
        url="${!envname:-$(pin "${var}_repo")}"
    fi
    [[ -n "$commit" && -n "$url" ]] || { echo "no pin for $var in launch_utils.py" >&2; exit 1; }
    step "repositories/$folder @ $commit"
    clone_at "$url" "$A1111_DIR/repositories/$folder" "$commit" '/*' '!/assets/'
done

step "virtual environment: $VENV_DIR ($PYTHON)"
if [[ ! -x "$VENV_DIR/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV_DIR"
fi
PY="$VENV_DIR/bin/python"
"$PY" -m pip install -q --upgrade pip

step "torch: $TORCH_PACKAGES"
# shellcheck disable=SC2086
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "$PY" -m pip install -q $TORCH_PACKAGES --extra-index-url "$TORCH_INDEX_URL"
else
    "$PY" -m pip install -q $TORCH_PACKAGES
fi

step "A1111 requirements_versions.txt (torch held at the installed build)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# setuptools: A1111 pins 69.5.1, torch 2.14 needs >= 77.0.3, and CLIP's setup.py (and pytorch_lightning
# 1.9) still import pkg_resources, which setuptools 81 and later no longer ship.
grep -v -E '^(torch[[:space:]]*|setuptools==.*)$' "$A1111_DIR/requirements_versions.txt" > "$WORK/requirements.txt"
echo "$SETUPTOOLS" >> "$WORK/requirements.txt"
"$PY" - "$WORK/constraints.txt" <<'EOF'
import sys, importlib.metadata as md
with open(sys.argv[1], "w") as f:
    for name in ("torch", "torchvision"):
        f.write(f"{name}=={md.version(name)}\n")
EOF
"$PY" -m pip install -q -r "$WORK/requirements.txt" -c "$WORK/constraints.txt"

step "openai/CLIP @ pinned commit (--no-deps: its requirements are already installed)"
CLIP_COMMIT="$(sed -n -E 's|.*openai/CLIP/archive/([0-9a-f]+)\.zip.*|\1|p' "$A1111_DIR/modules/launch_utils.py" | head -n 1)"
clone_at "$CLIP_URL" "$WORK/CLIP" "$CLIP_COMMIT"
"$PY" -m pip install -q --no-deps --no-build-isolation "$WORK/CLIP"

step "import check (CPU)"
"$PY" - <<'EOF'
import importlib.metadata, torch, torchvision, torchvision.ops, gradio, transformers, open_clip, clip  # noqa: F401
torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)  # a mismatched torchvision fails here
print("torch", torch.__version__, "torchvision", torchvision.__version__, "gradio", gradio.__version__,
      "transformers", transformers.__version__, "open_clip", importlib.metadata.version("open_clip_torch"))
EOF

step "offline tokenizers: $HF_DIR"
"$PY" "$HERE/make_a1111_hf_cache.py" "$HF_DIR"

if [[ -z "${SKIP_CHECKPOINTS:-}" ]]; then
    for family in sd15 sdxl sd3; do
        step "random-weight checkpoint: $family"
        HF_HOME="$HF_DIR" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
            "$PY" "$HERE/make_a1111_checkpoints.py" --webui "$A1111_DIR" --family "$family"
    done
fi

step "done"
cat <<EOF
Run the end-to-end tests (they start and stop their own server on 127.0.0.1):
  VSF_A1111_DIR=$A1111_DIR VSF_A1111_PYTHON=$PY python -m pytest -v -s tests/e2e -k a1111
  (optional: VSF_E2E_PORT=<port>, VSF_E2E_LOG_DIR=<folder for a1111-server.log>, VSF_A1111_HF_HOME=$HF_DIR)
EOF
