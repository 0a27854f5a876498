"""Class-wise op benchmark (see csfrn/bench/ops.py): python benchmarks/bench_ops.py [--device cuda] [--reps N]"""
from csfrn.bench.ops import main

if __name__ == "__main__":
    main()
