# Sourced by the reproduce scripts of experiments/replay/simulated/: strict mode, the repo root
# as working directory, the CLI ($C) and the experiments' MLflow store, and `corpus`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
C=${CANARYML:-.venv/bin/canaryml}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/data/experiments-mlflow.db}
mkdir -p data

corpus() {  # name seed [n=200]: simulate and ingest data/processed/sim-<name> unless it exists
  [ -f "data/processed/sim-$1/manifest.json" ] && return
  $C simulate out="data/raw/sim-$1" n="${3:-200}" seed="$2"
  $C ingest source=bundle input="data/raw/sim-$1" out="data/processed/sim-$1"
}
