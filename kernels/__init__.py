"""louver_kernels: sound sparse attention over a KV cache, usable in-process with no server.

The index returns every key whose raw score q.k reaches the threshold tau (zero false negatives),
proven by bounds computed from the index, and certifies the attention mass it skipped.
"""

from louver_kernels.config import IndexConfig, IndexKind
from louver_kernels.index import AttendOutput, LouverIndex, SearchResult
from louver_kernels.threshold import Dense, Fixed, Mass, Policy, Relative, TopK

__all__ = [
    "AttendOutput",
    "Dense",
    "Fixed",
    "IndexConfig",
    "IndexKind",
    "LouverIndex",
    "Mass",
    "Policy",
    "Relative",
    "SearchResult",
    "TopK",
]
