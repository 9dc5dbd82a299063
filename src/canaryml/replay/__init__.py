"""Replay: past deployments through the same Controller.step, on a simulated clock (DESIGN §7)."""
