"""Benchmarks importable from the installed package (``csfrn bench-ops``); scripts in benchmarks/ call these."""
