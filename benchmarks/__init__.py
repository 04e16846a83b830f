"""Benchmarks, importable as `mlmtrain.benchmarks` (each also runs as a script)."""
