"""export/triton."""
