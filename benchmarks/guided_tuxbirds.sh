#!/usr/bin/env bash
# Guided TuxBirds teachers side by side: contrast energy guidance, true-class energy guidance, none.
# Figures in docs/results/metrics.md ("Guided TuxBirds teachers").
#
#   bash benchmarks/guided_tuxbirds.sh [OUT_DIR]     # default runs/guided-tuxbirds
#
# Each teacher: B-cos ResNet-8 (width 16), TuxBirds 32 px, 3,000 training images (100 % correlated),
# 12 epochs of batch 64; evaluated on the 600 test images (four groups, unseen bird identities).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/guided-tuxbirds}"
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
COMMON=(data.name=tuxbirds data.image_size=32 data.seed=0 data.kwargs.counts.train=3000 data.kwargs.counts.val=300
        data.kwargs.counts.test=600 data.train_split=train data.eval_split=test progress=false checkpoint_every=0
        model.name=bcos_resnet8_small distill.explainer=bcos model.kwargs.width=16 optim.batch_size=64 optim.lr=3e-3
        optim.epochs=12 guidance.explainer=bcos guidance.explainer_kwargs.output=contributions seed=0 "output_dir=$OUT")
T=configs/tuxbirds/teacher.yaml
"$PY" -m e2kd train-teacher "$T" "${COMMON[@]}" guidance.kind=energy guidance.weight=5 guidance.contrast=true name=n3000-contrast-w5
"$PY" -m e2kd train-teacher "$T" "${COMMON[@]}" guidance.kind=null name=n3000-unguided
"$PY" -m e2kd train-teacher "$T" "${COMMON[@]}" guidance.kind=energy guidance.weight=5 guidance.contrast=false name=n3000-trueclass-w5
for run in n3000-unguided n3000-trueclass-w5 n3000-contrast-w5; do
  "$PY" benchmarks/waterbirds_margin.py "$OUT/$run" --counts 3000,300,600
done
