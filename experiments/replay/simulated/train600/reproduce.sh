#!/usr/bin/env bash
# The simulated headline with three times the training history: the same LSTM configuration
# trained on 600 deployments of seed 0 (a superset of the 200 of ../reproduce.sh), calibrated on
# seed 10 and evaluated on seeds 1-3 exactly as there. From the repo root:
#   bash experiments/replay/simulated/train600/reproduce.sh   (about 20 min on 2 cores)
source "$(dirname "$0")/../corpus.sh"
corpus train600 0 600
corpus calib 10 200
for s in 1 2 3; do corpus "eval$s" "$s" 200; done
[ -f models/sim-lstm-600/predictor.joblib ] || \
  $C train dataset=data/processed/sim-train600 scorer_out=models/sim-lstm-600 seed=0
$C replay model=models/sim-lstm-600 \
  'dataset=[data/processed/sim-eval1,data/processed/sim-eval2,data/processed/sim-eval3]' \
  replay.calibration.dataset=data/processed/sim-calib \
  'replay.policies=[scorer,scorer_nopredict,scorer_predict,kayenta]' \
  out=experiments/replay/simulated/train600/results
