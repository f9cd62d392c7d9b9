"""Vector indexes used by recall stages, saved as checked artifact folders."""

from .faiss_index import FaissIndex

__all__ = ["FaissIndex"]
