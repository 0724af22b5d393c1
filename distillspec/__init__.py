"""distillspec: train draft models for speculative decoding by on-policy distillation."""

__version__ = "0.1.0"
