#!/usr/bin/env bash
# `make test-slurm`: start the local single-node SLURM cluster (installing its packages if needed),
# run tests/slurm against it, and always stop the cluster again, whatever happened.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export MODE_SLURM_DIR=${MODE_SLURM_DIR:-/tmp/mode-slurm-test}
# own ports: a cluster started by hand (tools/local-slurm.sh start, ports 16817..) is left alone
export MODE_SLURM_PORT=${MODE_SLURM_PORT:-16827} MODE_SLURM_DB_PORT=${MODE_SLURM_DB_PORT:-16316}
t0=$SECONDS
if [ "$(id -u)" != 0 ]; then
    echo "test-slurm: FAILED: needs root to install and start a local SLURM cluster (tools/local-slurm.sh)" >&2
    exit 1
fi
trap 'tools/local-slurm.sh stop >/dev/null 2>&1 || echo "test-slurm: stopping the cluster failed; see $MODE_SLURM_DIR/log" >&2' EXIT
if ! tools/local-slurm.sh start; then
    echo "test-slurm: FAILED: could not start the local SLURM cluster (logs in $MODE_SLURM_DIR/log)" >&2
    exit 1
fi
started=$((SECONDS - t0))
eval "$(tools/local-slurm.sh env)"
export MODE_SLURM_TESTS=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
rc=0
"$PY" -m pytest -q -p no:cacheprovider --durations=5 --basetemp="$MODE_SLURM_DIR/pytest" tests/slurm "$@" || rc=$?
echo "test-slurm: cluster up in ${started} s; total $((SECONDS - t0)) s (exit $rc)"
exit $rc
