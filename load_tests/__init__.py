"""The load-testing harness behind `ragraph loadtest`, and the benchmarks (bench_*.py scripts)."""
