"""Data sources and input pipelines."""
