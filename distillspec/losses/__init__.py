"""Distillation losses (pure torch): token-level divergences (`divergences`) and SpecKD loss gating (`gating`)."""
