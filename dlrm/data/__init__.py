"""Criteo-shaped data: schema, synthetic generator, parquet loader."""
