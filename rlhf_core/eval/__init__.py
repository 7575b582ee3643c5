"""Evaluation helpers shared by the evaluation stages (statistics, tables)."""
