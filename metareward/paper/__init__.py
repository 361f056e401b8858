"""The paper's arithmetic and prompts, pure: parsing, selection, Elo, preferences, win rate, what it reports."""
