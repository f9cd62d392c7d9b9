"""An example Funnel plug-in: two stages registered through the ``funnel.stages`` entry point.

* ``filter.brand_quota`` (:class:`BrandQuotaFilter`) — at most N candidates of one brand per
  query, the best-ranked ones.
* ``features.price_band`` (:class:`PriceBandFeature`) — an int32 price-band column, with a CPU
  and a CUDA code path.

It imports only Funnel's public API (``pipeline`` and, in its tests, ``pipeline.testing``).
See ``docs/writing-a-stage.md`` in the Funnel repository for the walk-through.
"""

from importlib.metadata import PackageNotFoundError, version

from .brand_quota import BrandQuotaFilter
from .price_band import PriceBandFeature

try:
    __version__ = version("funnel-example-plugin")
except PackageNotFoundError:  # pragma: no cover - imported from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["BrandQuotaFilter", "PriceBandFeature", "__version__"]
