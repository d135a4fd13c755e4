# Sourced by the sbatch scripts of this folder (`source slurm/launch.sh || exit 2`). sbatch
# starts them in the submit directory: submit from the repository root. Settings, all optional:
#
# DMETA_VENV      the virtual environment, relative to the submit directory or absolute
#                 (default .venv); its bin/ goes first on PATH.
# DMETA_SETUP     a file sourced first, for the site's setup (`module load openmpi`, ...).
# DMETA_LAUNCHER  how ranks start: `mpiexec`, `srun` or any command (e.g. "mpirun --bind-to none").
#                 Unset: the venv's mpiexec when it exists (the pip MPICH of `make install`), else
#                 srun inside a SLURM allocation (a site MPI), else mpiexec on PATH.
# DMETA_SRUN_MPI  srun's --mpi plugin (default pmi2: MPICH; pmix: Open MPI).
#
# With --cpus-per-task, srun is given the same (SLURM >= 22.05 does not pass it on from sbatch),
# and dmeta's runtime.threads=0 gives each rank that many torch threads.

if [ -n "${DMETA_SETUP:-}" ]; then
  if [ ! -f "$DMETA_SETUP" ]; then
    echo "slurm/launch.sh: DMETA_SETUP=$DMETA_SETUP is not a file" >&2
    return 2
  fi
  # Site scripts (module, Lmod) may read unset variables: source them without `set -u`.
  case $- in *u*) dmeta_nounset=1; set +u ;; *) dmeta_nounset=0 ;; esac
  # shellcheck disable=SC1090  # the site's own file
  source "$DMETA_SETUP" || { echo "slurm/launch.sh: sourcing $DMETA_SETUP failed" >&2; return 2; }
  if [ "$dmeta_nounset" -eq 1 ]; then set -u; fi
  unset dmeta_nounset
fi

DMETA_VENV=${DMETA_VENV:-.venv}
case $DMETA_VENV in /*) ;; *) DMETA_VENV=$PWD/$DMETA_VENV ;; esac
export DMETA_VENV PATH="$DMETA_VENV/bin:$PATH"
if ! command -v dmeta >/dev/null; then
  echo "slurm/launch.sh: dmeta is not in $DMETA_VENV/bin nor on PATH (make install, or set" \
    "DMETA_VENV; submit from the repository root)" >&2
  return 2
fi

# One thread per rank unless the job gives each task more CPUs; srun gets them too.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} OPENBLAS_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

# The launcher command, for `dmeta sweep --launcher` and for `launch_ranks`; one error line and
# status 2 when there is none.
dmeta_launcher() {
  local choice=${DMETA_LAUNCHER:-} program
  if [ -z "$choice" ]; then
    if [ -x "$DMETA_VENV/bin/mpiexec" ]; then
      choice=mpiexec
    elif [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null; then
      choice=srun
    elif command -v mpiexec >/dev/null; then
      choice=mpiexec
    else
      echo "slurm/launch.sh: no launcher: no $DMETA_VENV/bin/mpiexec, not inside a SLURM job" \
        "with srun, no mpiexec on PATH; set DMETA_LAUNCHER" >&2
      return 2
    fi
  fi
  case $choice in
    mpiexec) program=$(command -v mpiexec) ;;  # the venv's first: it is first on PATH
    srun)
      program="$(command -v srun) --mpi=${DMETA_SRUN_MPI:-pmi2}"
      if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        program+=" --cpus-per-task=$SLURM_CPUS_PER_TASK"
      fi
      ;;
    *) program=$choice ;;
  esac
  # shellcheck disable=SC2086  # the first word of the command
  if [ -z "${program%% *}" ] || ! command -v ${program%% *} >/dev/null; then
    echo "slurm/launch.sh: launcher $choice not found (DMETA_LAUNCHER: mpiexec, srun or a" \
      "command)" >&2
    return 2
  fi
  echo "$program"
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
