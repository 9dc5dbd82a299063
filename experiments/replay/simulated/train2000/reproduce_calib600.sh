#!/usr/bin/env bash
# calib600/ and nodrift/ of experiments/replay/simulated/train2000/, from the repo root:
# bash experiments/replay/simulated/train2000/reproduce_calib600.sh   (about 20 min on 2 cores)
# The training corpus (seed 0, 2,000 deployments) and evaluation corpora (seeds 1-3) of
# reproduce.sh; every policy calibrated on 600 deployments of seed 10 at the observed
# false-rollback rate (no confidence bound). nodrift/: the same, with a second model trained
# with scorer.drift_weight=0 (the "without drift" ablation).
source "$(dirname "$0")/../corpus.sh"
corpus train2000 0 2000
corpus calib600 10 600
for s in 1 2 3; do corpus "eval$s" "$s" 200; done
[ -f models/sim-lstm-2000/predictor.joblib ] || \
  $C train dataset=data/processed/sim-train2000 scorer_out=models/sim-lstm-2000 seed=0
[ -f models/sim-lstm-2000-nodrift/predictor.joblib ] || \
  $C train dataset=data/processed/sim-train2000 scorer_out=models/sim-lstm-2000-nodrift seed=0 \
    scorer.drift_weight=0
EVAL='dataset=[data/processed/sim-eval1,data/processed/sim-eval2,data/processed/sim-eval3]'
$C replay model=models/sim-lstm-2000 "$EVAL" replay.calibration.dataset=data/processed/sim-calib600 \
  'replay.policies=[scorer,scorer_nopredict,scorer_predict,scorer_detector,argo,kayenta]' \
  out=experiments/replay/simulated/train2000/calib600
$C replay model=models/sim-lstm-2000 "$EVAL" replay.calibration.dataset=data/processed/sim-calib600 \
  'replay.policies=[scorer,scorer_nopredict]' \
  +replay.models.scorer_nodrift=models/sim-lstm-2000-nodrift \
  out=experiments/replay/simulated/train2000/nodrift
