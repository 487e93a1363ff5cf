#!/usr/bin/env bash
# The previous (v3) recipe: reproduces the EmoDB-trained checkpoint of v3 and training/reports/v3/ on a
# CPU. Its stage 1 (the EmoDB speech CNN) is what training/recipe.sh, the current default, starts from.
#   bash training/default_recipe.sh [DATA_DIR=../shared/data] [RUNS=runs/default]
# Stage 1: speech CNN on EmoDB (7 native classes, speaker-disjoint, seed 0: test speakers 11+13, val 12).
# Stage 2: text + context + fusion on MELD official train, the stage-1 CNN frozen, text-only
#          utterances paired with class-matched EmoDB clips of the training speakers + speech-only clips.
# Stage 3: the same stage-2 recipe on the `paper` and `paper-dialogues` splits (scores only).
# Then every evaluation JSON + PNG is written to training/reports/v3/ (the checkpoint to $RUNS/default.pt).
set -euo pipefail
DATA=${1:-../shared/data}
RUNS=${2:-runs/default}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
SPEECH_ARGS=${SPEECH_ARGS:---lr 2e-4 --class-weight balanced --label-smoothing 0.1 --epochs 25}
FUSION_ARGS=${FUSION_ARGS:---class-weight sqrt --vector-dropout 0.2 --label-smoothing 0.1}
REPORTS=training/reports/v3

$PY -m training train --data "emodb:$DATA/emodb" --split speakers --labels native \
    --out "$RUNS/speech" --threads "$THREADS" --no-progress $SPEECH_ARGS

# Stage 1b: refit the 7-class head on the frozen stage-1 CNN (cached embeddings, seconds): the
#           EmoDB 7-class held-out figure in MODEL_CARD.md comes from this model.
$PY -m training train --data "emodb:$DATA/emodb" --split speakers --labels native --init "$RUNS/speech/best.pt" \
    --init-parts speech --freeze-speech --class-weight balanced --patience 30 --out "$RUNS/speech-head" \
    --threads "$THREADS" --no-progress

for split in official paper paper-dialogues; do
  $PY -m training train --data "meld:$DATA/meld" --split "$split" --acted "emodb:$DATA/emodb" \
      --acted-split speakers --init "$RUNS/speech/best.pt" --init-parts speech --freeze-speech \
      --out "$RUNS/fusion-$split" --threads "$THREADS" --no-progress $FUSION_ARGS
done
mkdir -p "$REPORTS"
cp "$RUNS/fusion-official/best.pt" "$RUNS/default.pt"

ev() { $PY -m training evaluate --threads "$THREADS" "$@"; }
ev --checkpoint "$RUNS/default.pt" --data "meld:$DATA/meld" --split official:test --json "$REPORTS/meld_official_test.json"
ev --checkpoint "$RUNS/default.pt" --data "meld:$DATA/meld" --split official:val --json "$REPORTS/meld_official_dev.json"
ev --checkpoint "$RUNS/fusion-paper/best.pt" --data "meld:$DATA/meld" --split paper:test --json "$REPORTS/meld_paper_test.json"
ev --checkpoint "$RUNS/fusion-paper-dialogues/best.pt" --data "meld:$DATA/meld" --split paper-dialogues:test --json "$REPORTS/meld_paper_dialogues_test.json"
ev --checkpoint "$RUNS/speech-head/best.pt" --data "emodb:$DATA/emodb" --split speakers:test --json "$REPORTS/emodb_7class_heldout.json"
ev --checkpoint "$RUNS/default.pt" --data "emodb:$DATA/emodb" --split speakers:test --mode speech --json "$REPORTS/emodb_default_heldout_speech.json"
for run in speech speech-head fusion-official fusion-paper fusion-paper-dialogues; do
  cp "$RUNS/$run/curves.png" "$REPORTS/curves_$run.png"
  cp "$RUNS/$run/history.json" "$REPORTS/history_$run.json"
done
echo "default checkpoint: model/checkpoints/default.pt; reports: $REPORTS/"
