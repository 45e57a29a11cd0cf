"""Benchmarks of jbn against the other batch-norm layers: `python -m benchmarks.run`."""
