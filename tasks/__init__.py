"""Thin Prefect tasks: each runs one pipeline stage in a nested MLflow run and returns artifact paths."""
