#!/bin/sh
# Before/after in one run: the same benchmark script (from this checkout) against the dmeta
# package of each given commit, one after another on this machine.
#   benchmarks/compare_commits.sh COMMIT [COMMIT ...] -- bench_sine.py [ARGS ...]
# (pass bench_sine.py --no-compile for commits older than runtime.compile)
# Each commit is checked out into a temporary git worktree; PYTHONPATH puts its dmeta first.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python="$here/../.venv/bin/python"
commits=""
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do commits="$commits $1"; shift; done
[ "$#" -gt 1 ] || { echo "usage: $0 COMMIT [COMMIT ...] -- SCRIPT [ARGS ...]" >&2; exit 2; }
shift
script="$here/$1"; shift
tree=""
# A failing benchmark must not leave its worktree registered.
trap '[ -z "$tree" ] || git -C "$here/.." worktree remove --force "$tree"' EXIT
for commit in $commits; do
  tree=$(mktemp -d)
  git -C "$here/.." worktree add --detach -q "$tree" "$commit"
  echo "== dmeta at $(git -C "$tree" log -1 --format='%h %s' | cut -c1-90)"
  # Run from the worktree so that nothing puts this checkout's dmeta ahead of it.
  (cd "$tree" && PYTHONPATH="$tree" "$python" "$script" "$@")
  git -C "$here/.." worktree remove --force "$tree"
  tree=""
done
