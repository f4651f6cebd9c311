"""`hpo bench`: the measurements behind docs/performance.md."""
