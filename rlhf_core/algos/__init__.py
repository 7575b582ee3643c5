"""Pure torch math of the pipeline. Imports only torch and the standard library (a test enforces this)."""
