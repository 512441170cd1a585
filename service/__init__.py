"""retinaedge service (see DESIGN.md)."""
