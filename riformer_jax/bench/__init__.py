"""Benchmarks: scripts that print tables (throughput, edge runtimes, input pipeline,
per-op); never imported by the library."""
