"""Benchmark scripts (not tests): run as `python -m bench.<name>` or `python bench/<name>.py`."""
