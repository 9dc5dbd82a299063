#!/usr/bin/env bash
# Reproduces experiments/replay/simulated/train2000/ under the honest protocol (DESIGN §7), from
# the repo root: bash experiments/replay/simulated/train2000/reproduce.sh  (about 25 min on 2 cores)
#
#   training corpus     seed 0,  2000 deployments → the LSTM scorer (40,000 windows) and its
#                                                   breach predictor (train + test splits)
#   calibration corpus  seed 10, 2000 deployments → every policy's threshold and knobs, for
#                       ≤ 1 % false rollbacks at 80 % confidence (Clopper–Pearson upper bound)
#   evaluation corpora  seeds 1, 2, 3, 200 each   → replayed once, labels hidden
set -euo pipefail
cd "$(dirname "$0")/../../../.."
C=${CANARYML:-.venv/bin/canaryml}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/data/experiments-mlflow.db}
mkdir -p data

corpus() {  # name seed n
  [ -f "data/processed/sim-$1/manifest.json" ] && return
  $C simulate out="data/raw/sim-$1" n="$3" seed="$2"
  $C ingest source=bundle input="data/raw/sim-$1" out="data/processed/sim-$1"
}
corpus train2000 0 2000
corpus calib2000 10 2000
for s in 1 2 3; do corpus "eval$s" "$s" 200; done

[ -f models/sim-lstm-2000/predictor.joblib ] || \
  $C train dataset=data/processed/sim-train2000 scorer_out=models/sim-lstm-2000 seed=0
$C replay model=models/sim-lstm-2000 \
  'dataset=[data/processed/sim-eval1,data/processed/sim-eval2,data/processed/sim-eval3]' \
  replay.calibration.dataset=data/processed/sim-calib2000 replay.calibration.frr_confidence=0.8 \
  'replay.policies=[scorer,scorer_nopredict,scorer_predict,argo,kayenta]' \
  out=experiments/replay/simulated/train2000/results
