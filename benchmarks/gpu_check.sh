#!/usr/bin/env bash
# The device check, one GPU, under 5 minutes (time limits per part: 90 + 100 + 110 s): the tests
# marked gpu, a grid on the tiny space at 4 trials per GPU, and benchmarks/bench_gpu.py (the GPU
# against this machine's CPU, measured in the same run).
# Run from the repository root: bash benchmarks/gpu_check.sh (PYTHON=... picks the interpreter;
# default: the repository's .venv where it has one, else python).
# Results: ${OUT:-gpu_check_out}/gpu_check.txt (ratios first, then absolute numbers); the grid's
# runs under ${OUT:-gpu_check_out}/runs/gpu_tiny. Stops at once, with status 2, where CUDA is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
OUT_DIR=${OUT:-gpu_check_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)  # Ray's storage wants an absolute path
RESULT="$OUT_DIR/gpu_check.txt"
: > "$RESULT"

if ! "$PYTHON" -c "import tune_node" 2>/dev/null; then
    # Offline machines cannot fetch build tools: then the source tree itself is put on the path.
    "$PYTHON" -m pip install -q -e ".[dev]" || "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
        || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -c "import tune_node"
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: CUDA is not available to $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)')); nothing checked" \
        | tee -a "$RESULT" >&2
    exit 2
fi

log() { echo "$*" | tee -a "$RESULT"; }
started=$(date +%s)
log "gpu_check $(date -u +%FT%TZ): $("$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')"
# The C++ loops build once (cached), so the timed parts below do not pay for it.
"$PYTHON" -c "from tune_node.fast import adaptive_native, native
print('C++ loops:', 'built' if native.dense_loops() and adaptive_native.adaptive_loops() else 'not available')" | tee -a "$RESULT"

# (1) The tests marked gpu.
set +e
timeout 90 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -n 25 | tee "$OUT_DIR/pytest_gpu.txt"
tests_rc=${PIPESTATUS[0]}
set -e
log "pytest -m gpu: exit status $tests_rc ($(tail -n 1 "$OUT_DIR/pytest_gpu.txt"))"

# (2) The tiny grid at a quarter GPU per trial: 6 trials (no seed groups), 4 at once on the one GPU.
set +e
grid_start=$(date +%s)
timeout 100 "$PYTHON" -m tune_node.grid --space tiny --gpus 1 --gpus-per-trial 0.25 --no-seed-groups \
    --cpus-per-trial 1 --storage "$OUT_DIR/runs" --name gpu_tiny > "$OUT_DIR/grid_tiny.txt" 2>&1
grid_rc=$?
set -e
tail -n 15 "$OUT_DIR/grid_tiny.txt"
devices=$(grep -rhoE '"device": *"[^"]*"' "$OUT_DIR/runs/gpu_tiny" 2>/dev/null | sort | uniq -c | tr -s ' ' | paste -sd ';' - || true)
log "grid tiny --gpus 1 --gpus-per-trial 0.25: exit status $grid_rc in $(( $(date +%s) - grid_start )) s; devices recorded: ${devices:-none found}"

# (3) GPU against CPU, measured in this run: ratios first, then absolute numbers.
set +e
timeout 110 "$PYTHON" benchmarks/bench_gpu.py --out "$RESULT"
bench_rc=$?
set -e
log "bench_gpu: exit status $bench_rc; whole check $(( $(date +%s) - started )) s"

echo
echo "== $RESULT"
cat "$RESULT"
[ "$tests_rc" -eq 0 ] && [ "$grid_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
