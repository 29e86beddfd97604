"""aiportal monitor package (see DESIGN.md)."""
