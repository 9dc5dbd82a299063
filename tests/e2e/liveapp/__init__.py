"""A small real HTTP service (stable and canary versions) for the live end-to-end canary test."""
