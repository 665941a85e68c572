"""Benchmarks: each script prints one JSON line comparing tinkerd with a peer in the same run."""
