"""FAISS vector store of region descriptors, keyed by region id (docs/design.md §8).

``VectorStore`` (``store``) is the public face; each kind below is one module behind
the ``IndexKind`` protocol (``kind``), here with its FAISS index and bytes per vector:

========== ==================================================== ===========================
``flat``   ``IndexIDMap2(IndexFlatIP)``, exact (``flat``)       4·d + 16
``ivf``    ``IVF{nlist},Flat`` / ``SQ8`` / ``PQ{m}`` (``ivf``)  4·d + 8 / d + 8 / m + 8
``hnsw``   ``IndexIDMap2(HNSW{M},Flat)`` (``hnsw``)             4·d + 8·M + 16
``pqfs``   ``IVF{nlist},PQ{m}x4fs`` + fp16 re-rank (``pqfs``)   2·d + m/2 + 56
``ondisk`` ``IVF{nlist},Flat``, lists mmapped (``ondisk``)        8 resident; 4·d + 8 on disk
(string)   any IVF factory string, used as given (``ivf``)
========== ==================================================== ===========================

``planning`` chooses the kind and its size, ``calibration`` tunes the search width,
``ids`` keeps the id bookkeeping. Measurements: docs/benchmarks.md, "Vector store".
"""
from .calibration import ExactTopK
from .ids import IdFilter
from .kind import IndexKind
from .planning import (NAMED_KINDS, IndexPlan, IndexTypeError, VectorStoreSettings, bytes_per_vector, choose_kind,
                       choose_nlist, physical_memory_bytes, validate_index_type)
from .store import KINDS, VectorFileError, VectorStore

__all__ = ["KINDS", "NAMED_KINDS", "ExactTopK", "IdFilter", "IndexKind", "IndexPlan", "IndexTypeError", "VectorFileError", "VectorStore",
           "VectorStoreSettings", "bytes_per_vector", "choose_kind", "choose_nlist", "physical_memory_bytes",
           "validate_index_type"]
