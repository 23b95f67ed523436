"""Analysis tools: run comparison and speed benchmarks."""
