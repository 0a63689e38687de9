"""clemserve's tests, and the helpers they share (imported as ``tests.serving``, ``tests.standin``, ...).

A package so that the helpers are imported by name from the repository root: pytest puts the root on
``sys.path`` (``pythonpath`` in pyproject.toml), and the benchmarks run from it as ``python -m bench.<name>``.
"""
