#!/bin/sh
# pytest under mpiexec with one report: rank 0 prints as usual; any other rank is quiet unless
# it fails, and then prints its whole report. Usage: mpiexec -n N tests/mpi_pytest.sh PYTHON ARGS
python=$1
shift
rank=${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}
if [ "$rank" = 0 ]; then
  exec "$python" -m pytest "$@"
fi
log=$(mktemp)
"$python" -m pytest "$@" >"$log" 2>&1
status=$?
[ "$status" = 0 ] || { echo "== rank $rank:"; cat "$log"; }
rm -f "$log"
exit "$status"
