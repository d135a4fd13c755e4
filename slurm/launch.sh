# Sourced by the sbatch scripts of this folder. sbatch starts them in the submit directory:
# submit from the repository root.
#
# DMETA_LAUNCHER picks how ranks start (the README explains both):
#   mpiexec (default)  the venv's mpiexec, which matches the pip MPICH that `make install` uses;
#   srun               srun --mpi=$DMETA_SRUN_MPI (default pmi2: MPICH; pmix: Open MPI), for an
#                      mpi4py built against a site MPI with SLURM support.
# DMETA_VENV is the virtual environment (default .venv).

DMETA_VENV=${DMETA_VENV:-.venv}
export PATH="$PWD/$DMETA_VENV/bin:$PATH"
# One thread per rank unless the job gives each task more cores.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} OPENBLAS_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# The launcher command, for `dmeta sweep --launcher` and for `launch_ranks`.
dmeta_launcher() {
  case "${DMETA_LAUNCHER:-mpiexec}" in
    mpiexec) echo "$DMETA_VENV/bin/mpiexec" ;;
    srun) echo "srun --mpi=${DMETA_SRUN_MPI:-pmi2}" ;;
    *) echo "DMETA_LAUNCHER=$DMETA_LAUNCHER: use mpiexec or srun" >&2; return 2 ;;
  esac
}

# launch_ranks COMMAND...: become the launcher of COMMAND on the job's $SLURM_NTASKS ranks (it
# replaces the shell, so signals sent to its process id reach the launcher itself).
launch_ranks() {
  local launcher
  launcher=$(dmeta_launcher) || return 2
  # shellcheck disable=SC2086  # the launcher is a command and its options
  exec $launcher -n "$SLURM_NTASKS" "$@"
}

# supervise COMMAND...: run COMMAND with SLURM's warning signals (SIGUSR1 from --signal=B:,
# SIGTERM from scancel) passed on to it. dmeta then writes a checkpoint and exits with 75; the
# job is then requeued, and its next start resumes from the checkpoint. Some launchers (Open
# MPI's mpirun) report 1 instead of the ranks' 75, so any failure after a warning requeues too:
# the next start resumes from the newest checkpoint.
supervise() {
  "$@" &
  local pid=$! status=0
  DMETA_WARNED=0
  trap 'DMETA_WARNED=1; kill -USR1 "$pid" 2>/dev/null' USR1
  trap 'DMETA_WARNED=1; kill -TERM "$pid" 2>/dev/null' TERM
  wait "$pid" || status=$?
  # A trapped signal ends `wait` early; wait again until COMMAND itself has ended.
  while kill -0 "$pid" 2>/dev/null; do
    status=0
    wait "$pid" || status=$?
  done
  trap - USR1 TERM
  if [ "$status" -eq 75 ] || { [ "$DMETA_WARNED" -eq 1 ] && [ "$status" -ne 0 ]; }; then
    echo "dmeta: stopped with a checkpoint (status $status); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$status"
}
