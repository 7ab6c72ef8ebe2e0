"""Runnable benchmarks: ``python -m bench.NAME``. Not part of the test suite."""
