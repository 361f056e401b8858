"""Prefect tasks: thin wrappers that add caching, retries, tags and run names around metareward stages."""
