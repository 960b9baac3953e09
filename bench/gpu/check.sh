#!/usr/bin/env bash
# The GPU checks of issue 14 in one run, on a machine with a CUDA device whose python3 has torch (bench/gpu/wheels.txt
# lists what else it needs):
#   1. tests/gpu: the CPU and CUDA agree (the paper's ensemble; fp32, bf16 and fp16 autocast);
#   2. bench/inference.py --gpu-only --write-docs: images/s of the paper's ensemble, the bare forward pass against
#      the node's (Grad-CAM, embeddings), and GPU memory; it rewrites only its GPU subsection of docs/benchmarks.md;
#   3. bench/cost.py: the whole worker path with the networks on the device, by stage, and the worker's images/s
#      and GPU idle share with 0 to 15 processes decoding and writing beside it (the table is in cost.log).
# Prepare it here with `make gpu-kit` (.gpu/: the wheels and the four radiographs cost.py reads, git-ignored, about
# 30 MB), then on the device machine, from the repository root, carrying .gpu:   bash bench/gpu/check.sh
# Each step has its own time limit (about 9 minutes in all) and log, and a failed step does not stop the next. The
# logs and the rewritten docs/benchmarks.md go to $OUT (bench/out/gpu when OUT is unset).
set -u
out=${OUT:-bench/out/gpu}
kit=${GPU_KIT:-.gpu}
py=${GPU_PYTHON_BIN:-python3}
site=${GPU_SITE:-/tmp/cxr-site}
mkdir -p "$out"
: >"$out/summary.txt"

if compgen -G "$kit/wheels/*.whl" >/dev/null; then
    if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$kit"/wheels/*.whl >"$out/install.log" 2>&1; then
        echo "installing $kit/wheels failed: see install.log"
        tail -n 20 "$out/install.log"
        exit 2
    fi
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    echo "cores: $(nproc)"
    "$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
                                       "cuda", torch.cuda.is_available())'
    "$py" -c 'import cxr_node.app, cxr_node.work.loop; print("cxr_node imports: ok")'
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

step() {  # name, seconds, command...
    local name=$1 seconds=$2 start rc
    shift 2
    start=$(date +%s)
    timeout --kill-after=10 "$seconds" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(($(date +%s) - start)) s (log: $name.log)" | tee -a "$out/summary.txt"
    tail -n 30 "$out/$name.log"
}

data=()
[ -f "$kit/data/RG1_UNCR.dcm" ] && data=(--data "$kit/data")
step tests-gpu 120 "$py" -m pytest -m gpu tests/gpu -p no:cacheprovider -o addopts= -q -rs
step inference 180 "$py" bench/inference.py --gpu-only --write-docs
step cost 240 "$py" bench/cost.py --images 16 --overlap 32 --processes 0 2 4 8 15 "${data[@]}"
cp docs/benchmarks.md "$out/benchmarks.md"
