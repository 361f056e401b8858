"""Prefect tasks: thin wrappers that add caching, retries, tags, run names and artifacts around metareward's stages."""
