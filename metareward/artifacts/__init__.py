"""Artifacts: the store (local or S3, atomic writes), the Parquet schema of every table, the statistics stages
record."""
