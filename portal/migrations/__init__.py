"""Alembic migrations of the portal's database (``aiportal db upgrade``)."""
