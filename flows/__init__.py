"""Prefect flows: the campaign (parent) and one iteration; control flow only."""
