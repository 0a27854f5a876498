"""The benchmark report (see csfrn/bench/report.py): python benchmarks/report.py [--device cuda] [--quick]
Writes into benchmarks/results/ (next to this script, wherever it is run from) unless --out says otherwise."""
import os
import sys

from csfrn.bench.report import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    main(["--out", RESULTS, *sys.argv[1:]])
