"""Parallelism wraps models: process groups, projection roles, and the DeepSpeed engine bridge."""
