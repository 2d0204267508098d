"""The benchmark harness: sidekey against nginx and a direct call, in one run.

Run it with ``python -m bench`` (or ``bench/run``) from the repository root;
``docs/performance.md`` explains every arm and metric.
"""
