"""Vector indexes used by recall stages, saved as checked artifact folders."""

from .faiss_index import FaissIndex
from .torch_search import TorchSearch

__all__ = ["FaissIndex", "TorchSearch"]
