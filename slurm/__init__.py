"""Slurm: typed views of the cluster, pure parsers of Slurm's output, and the CLI backend.

Knows nothing of Flask or the portal's database (DESIGN.md: leaf package).
"""
