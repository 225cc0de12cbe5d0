"""Evaluation integrations: the lm-evaluation-harness adapter (lm_eval_adapter, optional extra lm-eval)."""
