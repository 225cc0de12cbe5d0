"""Retrieval for Atlas-style models: passage encoder, FAISS index build/shard/refresh, index service.

Empty in the walking skeleton; the index service and Atlas models land with issue 7.
"""
