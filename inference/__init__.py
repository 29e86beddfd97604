"""aiportal inference package (see DESIGN.md)."""
