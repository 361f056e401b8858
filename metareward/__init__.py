"""metareward: Meta-Rewarding (Wu et al. 2024) — actor, judge and meta-judge self-improvement by iterative DPO."""

__version__ = "0.1.0"
