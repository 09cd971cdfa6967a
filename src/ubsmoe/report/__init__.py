"""Reports of a run: summary.json, tables and plots."""
