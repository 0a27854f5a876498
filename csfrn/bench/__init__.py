"""Benchmarks importable from the installed package (``csfrn bench --what X``); scripts in benchmarks/ call these."""
