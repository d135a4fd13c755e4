#!/usr/bin/env bash
# Submit a sweep as a SLURM array (one element per member) and, after it, the collect step.
# Run from the repository root:
#   slurm/submit_sweep.sh SWEEP [OUT_DIR] [analysis/SCRIPT.py ...]
# e.g. slurm/submit_sweep.sh jobs/theorems_mu_sweep.toml runs/mu analysis/theorem1.py analysis/theorem2.py
# DMETA_VENV and DMETA_SETUP (slurm/launch.sh) hold here and in the jobs, which inherit them.
set -euo pipefail
source slurm/launch.sh || exit 2
sweep=${1:?usage: slurm/submit_sweep.sh SWEEP [OUT_DIR] [analysis/SCRIPT.py ...]}
out_dir=${2:-runs/$(basename "$sweep" .toml)}
shift $(( $# >= 2 ? 2 : 1 ))
count=$(dmeta sweep "$sweep" --count)
# The jobs' logs go next to the run files (SLURM does not create folders).
mkdir -p "$out_dir"
array=$(sbatch --parsable --array=0-$((count - 1)) --output="$out_dir/slurm-%x-%A_%a.out" \
  slurm/sweep_array.sbatch "$sweep" --out-dir "$out_dir")
# If an element fails, the collect job is cancelled rather than left waiting forever.
collect=$(sbatch --parsable --dependency=afterok:"$array" --kill-on-invalid-dep=yes \
  --output="$out_dir/slurm-%x-%j.out" slurm/collect.sbatch "$sweep" "$out_dir" "$@")
echo "array job $array ($count runs into $out_dir), collect job $collect"
