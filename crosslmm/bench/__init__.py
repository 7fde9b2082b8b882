"""Benchmarks: cost measurements that are run by command, never as timed tests."""
