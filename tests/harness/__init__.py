"""Test harnesses that start real services (Prometheus, tansu, kmock, MLflow)."""
