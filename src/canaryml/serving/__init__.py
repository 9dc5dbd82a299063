"""Live serving building blocks: sources (Prometheus, Kafka), actuators (Kubernetes, Argo
Rollouts, dry run), the durable decision log, and the observability HTTP server."""
