"""Evaluation: zero-shot multiple choice as lm-evaluation-harness defines it, and glue to lm-eval."""
