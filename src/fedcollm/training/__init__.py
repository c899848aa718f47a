"""Adapter training: the one optimisation loop, supervised fine-tuning and distillation losses."""
