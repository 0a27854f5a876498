"""Training-step benchmark (see csfrn/bench/train_step.py):
python benchmarks/bench_train_step.py [--size 321] [--batch 2] [--reps 5] [--device cpu] [--amp none] [--json F]"""

from csfrn.bench.train_step import main

if __name__ == "__main__":
    main()
