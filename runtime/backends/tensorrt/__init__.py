"""runtime/backends/tensorrt."""
