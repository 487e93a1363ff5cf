#!/usr/bin/env bash
# Reproduces model/checkpoints/default.pt and every report in training/reports/ on a CPU: the stages
# are training/stages.py (`emostream train`, `python -m training recipe`, which this calls).
#   bash training/recipe.sh [DATA_DIR=../shared/data] [RUNS=runs]
# STAGE1_FROM=CHECKPOINT takes the stage-1 encoder back out of a checkpoint; THREADS (default 1)
# sets torch threads per speech run; extra arguments after RUNS go to the recipe (e.g. --stages fusion).
set -euo pipefail
DATA=${1:-../shared/data}
RUNS=${2:-runs}
shift $(( $# < 2 ? $# : 2 ))
exec "${PY:-.venv/bin/python}" -m training recipe --data "$DATA" --runs "$RUNS" --threads "${THREADS:-1}" \
    ${STAGE1_FROM:+--text-from "$STAGE1_FROM"} "$@"
