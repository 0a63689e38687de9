"""clemserve's benchmarks, each run from the repository root as a module: ``python -m bench.overhead``."""
