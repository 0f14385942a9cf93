"""`python -m bench`: the benchmark suite (bench/run.py), which writes docs/benchmarks.md."""

import sys

from bench.run import main

sys.exit(main())
