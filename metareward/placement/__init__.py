"""Where a job runs and what it needs there: GPU memory estimates, engine placement."""
