"""Command tasks: `canaryml.tasks.<command>.run(cfg) -> int`."""
