"""Optuna studies over Hydra configs, tracked in MLflow (`canaryml tune`)."""
