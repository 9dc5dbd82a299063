#!/usr/bin/env bash
# Reproduces experiments/replay/simulated/ under the honest protocol (DESIGN §7), from the repo
# root: bash experiments/replay/simulated/reproduce.sh   (about 40 min on 2 cores)
#
#   training corpus     seed 0,  200 deployments  → the LSTM and Transformer scorers
#   calibration corpus  seed 10, 200 deployments  → every policy's threshold and knobs
#   evaluation corpora  seeds 1, 2, 3, 200 each   → replayed once, labels hidden
source "$(dirname "$0")/corpus.sh"
corpus train 0
corpus calib 10
for s in 1 2 3; do corpus "eval$s" "$s"; done

# predictor.joblib: models from before the breach predictor are retrained
[ -f models/sim-lstm/predictor.joblib ] || \
  $C train dataset=data/processed/sim-train scorer_out=models/sim-lstm seed=0
[ -f models/sim-transformer/predictor.joblib ] || \
  $C train dataset=data/processed/sim-train forecaster=transformer scorer_out=models/sim-transformer seed=0

$C replay model=models/sim-lstm \
  'dataset=[data/processed/sim-eval1,data/processed/sim-eval2,data/processed/sim-eval3]' \
  replay.calibration.dataset=data/processed/sim-calib \
  'replay.policies=[scorer,scorer_nopredict,scorer_predict,scorer_forecast,scorer_detector,argo,kayenta]' \
  +replay.models.scorer_transformer=models/sim-transformer \
  out=experiments/replay/simulated
