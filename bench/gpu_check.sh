#!/usr/bin/env bash
# make gpu-check: the GPU tests (tests/gpu, marker gpu), then the GPU benchmark (bench/gpu.py), in parts, each
# within a time limit and all within one deadline (7 minutes with the defaults), and one summary table at the
# end (bench/gpu_check.py says what each part does and where the table goes).
#
#   bench/gpu_check.sh [all|bench|tests,load,throughput,identity,nice] [--limit PART=S] [-- bench.gpu args]
#
# It runs from a plain checkout on a machine whose Python (PYTHON) has torch and transformers but perhaps not
# clemserve's small packages: what that Python lacks of grpcio, grpcio-status, grpcio-health-checking,
# grpcio-reflection, googleapis-common-protos, protobuf (>= 7.35, the generated code's), accelerate, pytest and
# pytest-timeout is installed, without network and without touching that Python, from the wheels in GPU_WHEELS
# (make gpu-wheels downloads them) into a folder of its own (GPU_CHECK_WORK); nvidia-ml-py too where there are
# wheels (without it the GPU budget comes from torch). clemserve itself is imported through a tree of links
# shaped like the installed package. A Python that has all of it (a checkout's .venv) needs no wheels.
set -euo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.cache/gpu-wheels}
WORK=$(mkdir -p "${GPU_CHECK_WORK:-.cache/gpu-check}" && cd "${GPU_CHECK_WORK:-.cache/gpu-check}" && pwd)
SITE=$WORK/site
command -v "$PY" >/dev/null || { echo "gpu-check: no Python $PY here; set PYTHON (GPU_PYTHON for make)" >&2; exit 2; }

# torch >= 2.8 (torch.AcceleratorError) and transformers >= 4.56 (dtype=), which no wheel here replaces; then
# the packages missing (or too old), by their wheel names: "needed" and "optional" lines
found=$("$PY" - <<'PY'
import importlib.metadata as md
import importlib.util
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
    sys.exit(2)

needs = {  # wheel name: (module, least version, needed); grpcio: the generated stubs refuse versions below 1.85.1
    "grpcio": ("grpc", (1, 85, 1), True), "grpcio-status": ("grpc_status", None, True),
    "grpcio-health-checking": ("grpc_health", None, True), "grpcio-reflection": ("grpc_reflection", None, True),
    "googleapis-common-protos": ("google.rpc", None, True), "protobuf": ("google.protobuf", (7, 35, 0), True),
    "accelerate": ("accelerate", None, True), "pytest": ("pytest", (8, 0, 0), True), "pluggy": ("pluggy", None, True),
    "iniconfig": ("iniconfig", None, True), "pytest-timeout": ("pytest_timeout", None, True),
    "nvidia-ml-py": ("pynvml", None, False),
}
lines = {True: [], False: []}
for wheel, (module, least, needed) in needs.items():
    try:
        there = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        there = False
    if not there or (least and (version(wheel) or (0,)) < least):
        lines[needed].append(wheel)
print(" ".join(lines[True]))
print(" ".join(lines[False]))
PY
) || exit 2
needed=$(sed -n 1p <<<"$found")
optional=$(sed -n 2p <<<"$found")
mkdir -p "$SITE"
if [ -d "$WHEELS" ] && [ -n "$needed$optional" ]; then
    echo "gpu-check: installing $needed $optional from $WHEELS into $SITE"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$SITE" --upgrade $needed $optional
elif [ -n "$needed" ]; then
    echo "gpu-check: missing $needed and no wheels in $WHEELS (make gpu-wheels where there is network)" >&2
    exit 2
elif [ -n "$optional" ]; then
    echo "gpu-check: no $optional here and no wheels in $WHEELS: the GPU budget comes from torch"
fi

# clemserve.* from this checkout, without installing it
mkdir -p "$WORK/tree/clemserve"
for p in registry client service; do ln -sfn "$PWD/$p" "$WORK/tree/clemserve/$p"; done
ln -sfn "$PWD/proto/clemserve/v1" "$WORK/tree/clemserve/v1"
export PYTHONPATH="$WORK/tree:$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

exec "$PY" -m bench.gpu_check --since "$start" --models "$WORK/models" "$@"
