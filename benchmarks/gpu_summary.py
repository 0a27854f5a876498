"""GPU session summary (see csfrn/bench/gpu_summary.py): python benchmarks/gpu_summary.py RESULTS_DIR"""
from csfrn.bench.gpu_summary import main

if __name__ == "__main__":
    main()
