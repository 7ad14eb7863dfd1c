"""Evaluation: reconstruction, retrieval and zero-shot metrics, picture grids."""
