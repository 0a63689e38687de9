#!/usr/bin/env bash
# make gpu-check: the GPU tests (tests/gpu, marker gpu), then the GPU benchmark (bench/gpu.py), from a plain
# checkout on a machine whose Python has torch (with CUDA) and transformers but not clemserve's small packages.
#
# What the Python lacks of grpcio-status, grpcio-health-checking, grpcio-reflection, googleapis-common-protos,
# protobuf (>= 7.35, the generated code's), nvidia-ml-py, accelerate and pytest is installed, without network
# and without touching that Python, from the wheels in GPU_WHEELS (make gpu-wheels downloads them) into a folder
# of its own; clemserve itself is importable through a tree of links shaped like the installed package.
#
#   PYTHON=python3 GPU_WHEELS=.cache/gpu-wheels GPU_BENCH_ARGS="--clients 1,8,32" bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.cache/gpu-wheels}
WORK=.cache/gpu-check
SITE=$WORK/site

"$PY" -c "import torch, transformers" 2>/dev/null || {
    echo "gpu-check: $PY cannot import torch and transformers; install them first (or set PYTHON)" >&2
    exit 2
}
# what no wheel here replaces: torch >= 2.8 (torch.AcceleratorError) and transformers >= 4.56 (dtype=), in one line
"$PY" - <<'PY' || exit 2
import importlib.metadata as md
import sys

def version(dist):
    try:
        return tuple(int(p) for p in md.version(dist).split("+")[0].split(".")[:3] if p.isdigit())
    except md.PackageNotFoundError:
        return ()

short = [
    f"{dist} >= {'.'.join(map(str, least))} (has {'.'.join(map(str, version(dist))) or 'none'})"
    for dist, least in (("torch", (2, 8)), ("transformers", (4, 56)))
    if version(dist) < least
]
if short:
    print(f"gpu-check: {sys.executable} needs " + "; ".join(short), file=sys.stderr)
    sys.exit(1)
PY

# the packages missing here (or too old), by their wheel names
missing=$("$PY" - <<'PY'
import importlib.metadata as md
import importlib.util

def version(dist):
    try:
        return tuple(int(p) for p in md.version(dist).split("+")[0].split(".")[:3] if p.isdigit())
    except md.PackageNotFoundError:
        return None

needs = {  # wheel name: (module, least version); grpcio: the generated stubs refuse versions below 1.85.1
    "grpcio": ("grpc", (1, 85, 1)), "grpcio-status": ("grpc_status", None), "grpcio-health-checking": ("grpc_health", None),
    "grpcio-reflection": ("grpc_reflection", None), "googleapis-common-protos": ("google.rpc", None),
    "protobuf": ("google.protobuf", (7, 35, 0)), "nvidia-ml-py": ("pynvml", None), "accelerate": ("accelerate", None),
    "pytest": ("pytest", (8, 0, 0)), "pluggy": ("pluggy", None), "iniconfig": ("iniconfig", None),
    "pytest-timeout": ("pytest_timeout", None),
}
out = []
for wheel, (module, least) in needs.items():
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found or (least and (version(wheel) or (0,)) < least):
        out.append(wheel)
print(" ".join(out))
PY
)
mkdir -p "$SITE"
if [ -n "$missing" ]; then
    if [ -d "$WHEELS" ]; then
        echo "gpu-check: installing $missing from $WHEELS into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$SITE" --upgrade $missing
    else
        echo "gpu-check: missing $missing and no wheels in $WHEELS (make gpu-wheels where there is network)" >&2
        exit 2
    fi
fi

# clemserve.* from this checkout, without installing it
mkdir -p "$WORK/tree/clemserve"
for p in registry client service; do ln -sfn "../../../../$p" "$WORK/tree/clemserve/$p"; done
ln -sfn ../../../../proto/clemserve/v1 "$WORK/tree/clemserve/v1"
export PYTHONPATH="$PWD/$WORK/tree:$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
# the tests and the benchmark both run, whatever the other does: a failing test still leaves the figures
echo "== GPU tests (tests/gpu, marker gpu)"
tests=0
"$PY" -m pytest -q -ra -m gpu -p no:cacheprovider tests/gpu || tests=$?
echo "== GPU benchmark (bench/gpu.py)"
bench=0
if [ "$cuda" = 1 ]; then
    "$PY" -m bench.gpu ${GPU_BENCH_ARGS:-} || bench=$?
else
    echo "gpu-check: no CUDA device here: the GPU tests above are skipped, the benchmark runs on the CPU, tiny"
    "$PY" -m bench.gpu ${GPU_BENCH_ARGS:---device cpu --clients 1,8 --calls 2 --max-tokens 8 --identity-rows 8 --only load,throughput,identity} || bench=$?
fi
# where a caller collects files (a remote run's $OUT), the tables go there too
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp docs/bench/gpu-*.md "$OUT"/ 2>/dev/null || true; fi
echo "gpu-check: tests $([ "$tests" = 0 ] && echo passed || echo "FAILED (pytest exit $tests)"), benchmark $([ "$bench" = 0 ] && echo ran || echo "FAILED (exit $bench)")"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
