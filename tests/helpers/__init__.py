"""Shared helpers of the test suite: case tables, reference checks, models, graph renderings,
the fuzzer's grammar (not collected as tests)."""
