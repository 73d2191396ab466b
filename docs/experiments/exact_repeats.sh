#!/bin/bash
# Stage 2 on few-shot documents in which a share of the examples repeat an earlier one exactly (image and answer;
# emu2.data.shapes.tasks.EXACT_REPEAT_PROB), against the same stage 2 on the recipe's documents, from the same
# stage-1 model (docs/training-notes.md, "What the few-shot documents are made of").
# Usage: bash docs/experiments/exact_repeats.sh OUT PROB   (OUT: a docs/experiments/stage1_lm_lr.sh output)
set -euo pipefail
D=${1:?give the stage1_lm_lr.sh output directory}; P=${2:-0.3}
E=${EMU2:-.venv/bin/emu2}; PY=${PYTHON:-.venv/bin/python}
C="log.tensorboard=false log.progress=false mixed_precision=no seed=0"
R="$D/data_rep$P"
if [ ! -f "$R/dataset.json" ]; then
  cp -as "$(realpath "$D/data")" "$R"
  rm "$R"/train/interleaved-*.tar
  $PY - "$R" "$P" <<'PY'
import json, sys
import emu2.data.shapes.tasks as tasks
from emu2.data.shapes.write import _write_kind
root, prob = sys.argv[1], float(sys.argv[2])
tasks.EXACT_REPEAT_PROB = prob
seed = json.load(open(f"{root}/dataset.json"))["seed"]
print(_write_kind(root, seed, "train", "interleaved", 1500, 64, 250))
PY
fi
[ -f "$D/s2rep$P/config.json" ] || $E train shapes-stage2 model.init_from="$D/s1base" output_dir="$D/s2rep$P" \
  data.root="$R" steps=160 $C
$PY - "$D" "$P" <<'PY'
import json, sys
from emu2.eval.shapes import copy_accuracy, evaluate_fewshot
from emu2.pipelines import Emu2Pipeline
root, prob = sys.argv[1], sys.argv[2]
pipe = Emu2Pipeline.from_pretrained(f"{root}/s2rep{prob}")
print(json.dumps({"copy": copy_accuracy(pipe), "fewshot": evaluate_fewshot(pipe, f"{root}/data")}))
PY
