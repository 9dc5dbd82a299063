#!/usr/bin/env bash
# Reproduces experiments/replay/simulated/train2000/ under the honest protocol (DESIGN §7), from
# the repo root: bash experiments/replay/simulated/train2000/reproduce.sh  (about 25 min on 2 cores)
#
#   training corpus     seed 0,  2000 deployments → the LSTM scorer (40,000 windows) and its
#                                                   breach predictor (train + test splits)
#   calibration corpus  seed 10, 2000 deployments → every policy's threshold and knobs, for
#                       ≤ 1 % false rollbacks at 80 % confidence (Clopper–Pearson upper bound)
#   evaluation corpora  seeds 1, 2, 3, 200 each   → replayed once, labels hidden
source "$(dirname "$0")/../corpus.sh"
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
