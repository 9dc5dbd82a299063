"""Benchmarks: `canaryml bench` / `make bench` write experiments/benchmarks/*.json."""
