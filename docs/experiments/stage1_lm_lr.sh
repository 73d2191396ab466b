#!/bin/bash
# Stage 1 at the recipe's LM learning rate (1e-3) and at 1e-4, from the same LM and encoder stages, each followed
# by the same stage 2; then copying after every stage and the few-shot curve after stage 2 (docs/training-notes.md,
# "Stage 1's LM learning rate"). Steps are the quickstart's at --budget 36 on the slower CPU, fixed so that the
# result does not depend on machine load. Usage: bash docs/experiments/stage1_lm_lr.sh OUT  (about 50 CPU minutes)
set -euo pipefail
D=${1:?give an output directory}
E=${EMU2:-.venv/bin/emu2}; PY=${PYTHON:-.venv/bin/python}
C="log.tensorboard=false log.progress=false mixed_precision=no seed=0"
[ -f "$D/data/dataset.json" ] || $PY -c "
from emu2.data.shapes import write_shapes
write_shapes('$D/data', seed=0, num_train=1500, num_episodes=50, num_lm=15000)"
[ -f "$D/lm/config.json" ] || $E train shapes-lm output_dir="$D/lm" data.root="$D/data" steps=1500 $C
[ -f "$D/encoder/config.json" ] || $E train shapes-encoder model.init_from="$D/lm" output_dir="$D/encoder" \
  data.root="$D/data" steps=1045 $C
for V in base:1.0e-3 low:1.0e-4; do
  N=${V%%:*}; LR=${V##*:}
  [ -f "$D/s1$N/config.json" ] || $E train shapes-stage1 model.init_from="$D/encoder" output_dir="$D/s1$N" \
    data.root="$D/data" steps=154 optim.lr.lm=$LR $C
  [ -f "$D/s2$N/config.json" ] || $E train shapes-stage2 model.init_from="$D/s1$N" output_dir="$D/s2$N" \
    data.root="$D/data" steps=160 $C
done
$PY - "$D" <<'PY'
import json, sys
from emu2.eval.shapes import copy_accuracy, evaluate_fewshot
from emu2.pipelines import Emu2Pipeline
root = sys.argv[1]
out = {f"copy_{n}": copy_accuracy(Emu2Pipeline.from_pretrained(f"{root}/{n}")) for n in ("lm", "s1base", "s1low", "s2base", "s2low")}
out.update({f"fewshot_{n}": evaluate_fewshot(Emu2Pipeline.from_pretrained(f"{root}/{n}"), f"{root}/data") for n in ("s2base", "s2low")})
print(json.dumps(out))
PY
