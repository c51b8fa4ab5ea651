"""Alembic migrations, shipped in the package and run by the program (`kiln db upgrade`).

A released revision is never edited: fix forward with a new revision.
"""
