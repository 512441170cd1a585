"""retinaedge device (see DESIGN.md)."""
