"""Performance measurement: the whole-step benchmark (``tools/benchmark.py``)."""
