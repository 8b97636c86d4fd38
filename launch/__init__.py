"""Entry points: train, layout, tokenize; environment detection and config validation."""
