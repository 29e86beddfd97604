"""aiportal storage package (see DESIGN.md)."""
