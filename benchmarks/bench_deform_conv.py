"""Deformable convolution benchmark (see csfrn/bench/deform.py).

python benchmarks/bench_deform_conv.py --json out.json
"""

from csfrn.bench.deform import main

if __name__ == "__main__":
    main()
