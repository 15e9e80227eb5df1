"""Retrieval for the RAG stage: documents, BM25, sentence embeddings, an on-disk vector index, fusion.

Nothing here knows about gRPC or the stages: the RAG stage and ``orchestrator index`` both build on it.
"""
