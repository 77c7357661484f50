"""Shared helpers of the test suite: case tables, reference checks, models, graph renderings."""
