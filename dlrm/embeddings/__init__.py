"""Embedding backends behind one contract (see base.py) and the registry that picks them."""

from dlrm.embeddings.base import EmbeddingBackend, TableSpec
from dlrm.embeddings.registry import build_embeddings

__all__ = ["EmbeddingBackend", "TableSpec", "build_embeddings"]
