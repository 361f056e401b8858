"""The stage pipeline: the registry, runners, cached jobs, manifests, code fingerprints, the summary."""
