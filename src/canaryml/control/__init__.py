"""Decision path shared by replay and serving: sources → scorer → policy → actuator."""
