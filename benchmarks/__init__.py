"""`make bench`: stage-1 and stage-2 benchmarks (`python -m benchmarks.run --help`); results in BENCHMARKS.md."""
