"""Models and training: checkpoints and their digests, DPO and SFT with TRL."""
