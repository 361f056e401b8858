"""The campaign's configuration: one validated pydantic object with the paper's defaults, and its sections."""
