"""Fixture builders for tests and benchmarks: tiny random-weight pipelines, distributed helpers."""
