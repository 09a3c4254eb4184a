"""louver_kernels: sound sparse attention over a KV cache, usable in-process with no server.

The index returns every key whose raw score q.k reaches the threshold tau (zero false negatives),
proven by bounds computed from the index, and certifies the attention mass it skipped.
"""

if __name__ == "louver_kernels":
    from louver_kernels.config import IndexConfig, IndexKind
    from louver_kernels.index import AttendOutput, LouverIndex, SearchResult
    from louver_kernels.threshold import Dense, Fixed, Mass, Policy, Relative, TopK
else:  # pragma: no cover - the source folder imported under its folder name
    # With the repository root on sys.path, ``import kernels`` finds this folder (transformers
    # probes for a Hub package of that name). Look like an empty namespace package then, so the
    # probe answers "not installed" and nothing is imported twice under two names.
    __file__ = None  # type: ignore[assignment]

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
