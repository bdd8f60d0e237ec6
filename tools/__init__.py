"""Tooling beside the algorithm: speed benchmarks, the GPU acceptance run, the memory model."""
