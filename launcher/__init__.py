"""Thin entry points that compose the libraries: pretrain, and later build_index, convert, evaluate, generate."""
