"""Analysis of tune-node results: critical step sizes, tables and figures (reads results tables, never trains)."""
