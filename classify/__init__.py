"""Long-sequence classification: ListOps and sequential digits tasks, a trainer, and the ViT on digits."""
