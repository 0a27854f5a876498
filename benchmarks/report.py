"""Benchmark report (see csfrn/bench/report.py): python benchmarks/report.py [--device cpu] [--out DIR] [--quick]"""
from csfrn.bench.report import main

if __name__ == "__main__":
    main()
