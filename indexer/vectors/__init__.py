"""FAISS vector store of region descriptors, keyed by region id (DESIGN.md §7).

``store`` holds the store's public face; one module per index kind (``flat``,
``ivf``, ``hnsw``, ``pqfs``) behind the ``IndexKind`` protocol of ``kind``;
``planning`` chooses the kind, ``calibration`` tunes its search width, ``ids``
keeps the id bookkeeping. Measurements behind the defaults: docs/benchmarks.md.
"""
from .calibration import ExactTopK
from .ids import IdFilter
from .kind import IndexKind
from .planning import (NAMED_KINDS, IndexPlan, IndexTypeError, VectorStoreSettings, bytes_per_vector, choose_kind,
                       choose_nlist, physical_memory_bytes, validate_index_type)
from .store import KINDS, VectorStore

__all__ = ["KINDS", "NAMED_KINDS", "ExactTopK", "IdFilter", "IndexKind", "IndexPlan", "IndexTypeError", "VectorStore",
           "VectorStoreSettings", "bytes_per_vector", "choose_kind", "choose_nlist", "physical_memory_bytes",
           "validate_index_type"]
