"""Benchmark scripts, one per question; run each as a module from the repository root
(``python -m benchmarks.schedules ...``) so that no script name can shadow an installed package."""
