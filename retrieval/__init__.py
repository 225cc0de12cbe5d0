"""Retrieval for Atlas-style models (issue 7): passages -> bi-encoder -> FAISS index -> service -> refresh.

passages.py  passage store (~100-word passages, stable hashed ids, text memory-mapped from disk)
encoder.py   Contriever-style bi-encoder from the project's blocks; pretrained.py: optional MiniLM
index.py     flat / IVF-PQ (+ exact re-rank) / HNSW shards, versioned folders with manifests
build.py     embed + build (sharded over ranks) + publish; incremental refresh through id maps
live.py      a swappable in-process index; batcher.py, service.py, client.py: the HTTP index service
protocol.py  `Retriever` (in-process index and client alike) and `Embedder`
refresh.py   Atlas's staleness strategies: scheduled refresh, over-retrieve-and-rerank, query-side-only
retrieve.py  `PassageRetriever`, the interface the Atlas model calls
"""
