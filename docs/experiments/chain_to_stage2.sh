#!/bin/bash
# The quickstart's chain from the LM stage to stage 2 at fixed step counts (default: those of the 21cc5f6
# quickstart), then few-shot and copying on the stage-2 model: builds compared at equal steps rather than equal time.
#   bash docs/experiments/chain_to_stage2.sh DATA_DIR OUT [LM ENCODER STAGE1 STAGE2]
# DATA_DIR: `emu2 data shapes --out DATA_DIR --num-train 1500 --num-episodes 50 --num-lm 15000`.
set -euo pipefail
D=$1 O=$2 LM=${3:-1500} ENC=${4:-1146} S1=${5:-215} S2=${6:-119}
common="data.root=$D log.tensorboard=false log.progress=false seed=0"
emu2 train shapes-lm output_dir=$O/lm $common model.preset=shapes mixed_precision=bf16 steps=$LM checkpoint.every=$LM
emu2 train shapes-encoder output_dir=$O/encoder $common model.init_from=$O/lm mixed_precision=no steps=$ENC checkpoint.every=$ENC
emu2 train shapes-stage1 output_dir=$O/stage1 $common model.init_from=$O/encoder mixed_precision=bf16 steps=$S1 checkpoint.every=$S1
emu2 train shapes-stage2 output_dir=$O/stage2 $common model.init_from=$O/stage1 mixed_precision=bf16 steps=$S2 checkpoint.every=$S2
python - "$O/stage2" "$D" <<'PY'
import json, sys
from emu2.eval.shapes import copy_accuracy, evaluate_fewshot, fewshot_table
from emu2.pipelines import Emu2Pipeline
pipe = Emu2Pipeline.from_pretrained(sys.argv[1])
scores = evaluate_fewshot(pipe, sys.argv[2])
print(fewshot_table(scores))
print(json.dumps({"copying": copy_accuracy(pipe), "heldout_words": copy_accuracy(pipe, words="held-out")}))
PY
