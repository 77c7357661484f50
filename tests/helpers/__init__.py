"""Support code shared by several test files (not collected as tests)."""
