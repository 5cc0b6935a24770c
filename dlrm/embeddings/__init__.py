"""Embedding backends behind one contract (base.py), picked by an explicit registry (registry.py)."""

from dlrm.embeddings.base import EmbeddingBackend, Runtime, TableSpec
from dlrm.embeddings.registry import BACKENDS, build_embeddings

__all__ = ["BACKENDS", "EmbeddingBackend", "Runtime", "TableSpec", "build_embeddings"]
