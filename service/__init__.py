"""retinaedge service: the HTTP API, the engine choice, boot and benchmarks (docs/architecture.md)."""
