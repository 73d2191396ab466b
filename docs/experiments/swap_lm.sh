#!/bin/bash
# A quickstart's image stages rerun on another language model: the LM is put into the quickstart's encoder-stage
# model (that stage freezes the LM, so the vision side stays the quickstart's), then the quickstart's own stage-1
# and stage-2 configs run at its steps, and stage 2 is scored few-shot (docs/training-notes.md, "Binding in words
# does not carry to the few-shot prompt"). OUT/stage2 is also where a chat run starts (`referring.py`).
#   bash docs/experiments/swap_lm.sh QUICKSTART LM OUT
# QUICKSTART: an `emu2 quickstart` output (runs/quickstart); LM: a model directory of the same preset whose
# language_model.* weights are used (e.g. QUICKSTART/lm-long itself, the control, or an LM trained on from it).
set -euo pipefail
Q=${1:?give the quickstart directory} LM=${2:?give the LM model directory} O=${3:?give the output directory}
E=${EMU2:-.venv/bin/emu2}; PY=${PYTHON:-.venv/bin/python}
C="data.root=$Q/data log.tensorboard=false log.progress=false"
mkdir -p "$O"
$PY - "$Q/encoder" "$LM" "$O/encoder" <<'PY'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
encoder, lm, out = map(Path, sys.argv[1:])
shutil.copytree(encoder, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
weights, lm_weights = load_file(encoder / "model.safetensors"), load_file(lm / "model.safetensors")
keys = [k for k in weights if k.startswith("language_model.")]
missing = [k for k in keys if k not in lm_weights or lm_weights[k].shape != weights[k].shape]
if missing:
    sys.exit(f"{lm} does not have the quickstart's LM weights: {missing[:5]} ({len(missing)} in all)")
weights.update({k: lm_weights[k] for k in keys})
save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
print(f"{len(keys)} LM tensors from {lm}")
PY
$E train "$Q/stage1/train_config.yaml" model.init_from="$O/encoder" output_dir="$O/stage1" $C
$E train "$Q/stage2/train_config.yaml" model.init_from="$O/stage1" output_dir="$O/stage2" $C
$PY - "$O/stage2" "$Q/data" <<'PY'
import json, sys
from emu2.eval.shapes import evaluate_fewshot, fewshot_table
from emu2.pipelines import Emu2Pipeline
scores = evaluate_fewshot(Emu2Pipeline.from_pretrained(sys.argv[1]), sys.argv[2])
print(fewshot_table(scores))
json.dump(scores, open(f"{sys.argv[1]}/fewshot.json", "w"), indent=1)
PY
