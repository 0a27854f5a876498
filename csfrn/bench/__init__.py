"""The benchmarks users run, ``csfrn bench --what ops | deform | train | export`` (one module each, ``timing``
their shared helpers); benchmarks/ in the repository holds the scripts that call them, the report and the GPU
session's tools."""
