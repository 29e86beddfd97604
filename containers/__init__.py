"""aiportal containers package (see DESIGN.md)."""
