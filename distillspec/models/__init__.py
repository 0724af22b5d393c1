"""Model construction and loading: the offline SmolLM2 pair, HF ids, tiny test models."""
