"""Class-wise op benchmark (see csfrn/bench/ops.py): python benchmarks/bench_ops.py [--device cuda] [--reps N]
Writes benchmarks/results/class_ops-<device>.json (next to this script, wherever it is run from) unless --out or
--json says otherwise."""

import os
import sys

from csfrn.bench.ops import main

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    main(["--out", RESULTS, *sys.argv[1:]])
