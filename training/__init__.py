"""The training loop and what it needs around it: optimizer groups, LR schedule, metrics, checkpoints."""
