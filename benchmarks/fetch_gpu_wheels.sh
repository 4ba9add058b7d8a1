#!/usr/bin/env bash
# Download into .whl/ the wheels benchmarks/gpu.sh installs on the GPU machine, which has no network.
#
# That machine has Python 3.12 (x86-64) with torch, transformers, accelerate, safetensors,
# huggingface-hub, numpy and Pillow, but not diffusers, pydantic or aiosqlite, which the real
# bot path (Settings, Service, SqliteStore) needs. Versions are the ones tested here.
# PYTHON_VERSION and DEST override the target (e.g. 3.11 and a scratch folder for a local dry run).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
DEST="${DEST:-.whl}"
WHEELS=(
    diffusers==0.42.1
    pydantic==2.14.4
    pydantic-core==2.50.5            # compiled: the one build for PYTHON_VERSION
    pydantic-settings==2.16.3
    typing-inspection==0.4.5
    annotated-types==0.8.0
    typing-extensions==4.16.0        # pydantic 2.14 needs >= 4.16; the machine's may be older
    python-dotenv==1.2.4
    aiosqlite==0.22.1
    torchao==0.18.0                  # QUANTIZE=fp8/int8 rows (built for torch 2.13; check the machine's torch)
    bitsandbytes==0.50.2             # QUANTIZE=nf4 and the 8 GiB budget row
)

# git ignores the folder (it travels to the GPU machine as a carried path, never in a commit)
exclude="$(git rev-parse --git-path info/exclude 2>/dev/null || true)"
if [ -n "$exclude" ] && [ "$DEST" = .whl ]; then
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.whl # one version of each: two would stop the install there
python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
ls -1 "$DEST"
du -sh "$DEST"
