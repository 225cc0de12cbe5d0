"""Hugging Face transformers wrappers, copied next to a converted checkpoint for ``trust_remote_code=True``."""
