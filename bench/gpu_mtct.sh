#!/usr/bin/env bash
# MTCT as two rows vs the shared prefix on one GPU: the full-size InternVL3-2B-hf (random
# weights built on the device from the checkpoint's config, tokenizer and processor), bf16,
# LoRA rank 8 on the vision tower and the language model, gradient checkpointing,
# 8 examples (4 images, both paths) per step, 227x227 and 640x480 images, 300-token chains.
# Prints samples/s, tokens/s, peak GPU memory and MFU (6 x parameters x tokens / time / the
# GPU's peak dense bf16 FLOP/s) for both layouts, then the summary line. Needs no network;
# stops itself after 8 minutes.
#
#   [DBR_REAL_SHAPES=<folder holding internvl3_2b_hf/>] [WHEELS=<folder of wheels>] bench/gpu_mtct.sh [--dry-run]
#
# A GPU machine without network brings what it lacks as wheels (downloaded elsewhere for its
# Python with `pip download --only-binary=:all: --python-version X.Y trl datasets polars ...`):
# WHEELS names their folder, and they are installed from it with `pip install --no-index`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# The real checkpoint files: $DBR_REAL_SHAPES, else a shared/real_shapes beside or inside the checkout.
SHAPES=${DBR_REAL_SHAPES:-}
for candidate in ../shared/real_shapes shared/real_shapes; do
    [ -n "$SHAPES" ] || { [ -d "$candidate/internvl3_2b_hf" ] && SHAPES=$candidate; }
done
NEEDED=(torch transformers trl peft accelerate datasets polars PIL jinja2 rich)
ARGS=(--full --images 4 --steps 4 --real-shapes "${SHAPES:-<DBR_REAL_SHAPES>}")
LIMIT_S=480

if [ "${1:-}" = "--dry-run" ]; then
    echo "gpu_mtct: would check the GPU (nvidia-smi) and the packages ${NEEDED[*]}"
    echo "gpu_mtct: would install missing ones from \$WHEELS (${WHEELS:-not set}) with pip --no-index,"
    echo "  and this repository with pip install --no-deps --no-build-isolation -e . where it is not installed"
    echo "gpu_mtct: would run, stopped after ${LIMIT_S} s:"
    echo "  $PY bench/bench_mtct.py ${ARGS[*]}"
    echo "gpu_mtct: per image size (227x227, 640x480) and layout (two rows, shared prefix), each in its own process:"
    echo "  InternVL3-2B-hf at full size from its config, bf16, LoRA r8 (vision + language),"
    echo "  gradient checkpointing, 8 examples per step, 4 steps (the first not timed)"
    [ -n "$SHAPES" ] || echo "gpu_mtct: no internvl3_2b_hf/ found: set DBR_REAL_SHAPES to the folder holding it"
    exit 0
fi

[ -n "$SHAPES" ] || { echo "gpu_mtct: set DBR_REAL_SHAPES to the folder holding internvl3_2b_hf/" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
missing=$("$PY" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "${NEEDED[@]}")
if [ -n "$missing" ]; then
    [ -n "${WHEELS:-}" ] || { echo "gpu_mtct: missing $missing: set WHEELS to a folder of their wheels" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" ${missing//PIL/pillow}
fi
"$PY" -c 'import domainbed_reasoning.train.mtct' 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_mtct: no CUDA device visible: run on the GPU machine, or use --dry-run")
print("gpu_mtct:", torch.cuda.get_device_name(), "torch", torch.__version__)
'
timeout "$LIMIT_S" "$PY" bench/bench_mtct.py "${ARGS[@]}"
