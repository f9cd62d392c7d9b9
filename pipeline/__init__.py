"""Funnel: multi-stage retrieval and ranking over Apache Arrow.

The public API. Plug-ins and users import from here (or from :mod:`pipeline.testing` for the
conformance kit), never from private modules (``pipeline.stage``, ``pipeline.schema`` ...) or
from the built-in ``stages`` and ``indexes`` packages, whose insides may change between
releases::

    from pipeline import Stage, StageTags, Pipeline, load_config

Every name in ``__all__``, by purpose:

Writing a stage
    ``Stage`` (the contract: see its module docstring), ``StageTags`` (devices, level,
    determinism ...), ``ANY`` and ``EMBEDDING`` (field types for declared schemas),
    ``keep_input_types`` (cast columns a dataframe engine widened back to their input types),
    ``resolve_device`` and ``cuda_available`` (for ``warm_up()`` and CUDA paths),
    ``BuildContext`` and ``find_upstream`` (for stages whose ``build(upstream, ctx)`` makes
    artifacts under ``funnel build``).
Column names
    ``QUERY_ID``, ``QUERY``, ``HISTORY``, ``QUERY_EMBEDDING`` (query level), ``ITEM_ID``,
    ``SCORE``, ``RANK``, ``SOURCE``, ``RECALL_SCORE``, ``RECALL_RANK`` (candidate level) and
    ``RELEVANCE`` (judgments).
Composing and running
    ``Pipeline`` (``a >> b``), ``StageStats`` (per-stage rows and seconds of a run),
    ``PipelineConfig`` and ``load_config`` (TOML configs).
Registry
    ``register_stage`` (in-process registration), ``get_stage_class``, ``available_stages``,
    ``ENTRY_POINT_GROUP`` (``"funnel.stages"``, the entry-point group plug-ins declare).
Errors
    ``FunnelError`` and its subclasses ``SchemaError``, ``ConfigError``, ``ArtifactError``,
    ``DataError``, ``DeviceError``, ``DependencyError``; the message templates ``MISSING_COLUMN``,
    ``WRONG_TYPE``, ``BAD_PARAM`` (what ``Stage._bad_param`` fills in) and ``MISSING_EXTRA``;
    ``require_extra`` (check a stage's or command's optional packages first, naming the extra
    and its ``pip install``); ``FunnelWarning`` (input that runs but probably not as meant; the
    command line prints it as one ``funnel: warning:`` line).
Version
    ``__version__``.
"""

from .build import BuildContext, find_upstream
from .columns import (
    HISTORY,
    ITEM_ID,
    QUERY,
    QUERY_EMBEDDING,
    QUERY_ID,
    RANK,
    RECALL_RANK,
    RECALL_SCORE,
    RELEVANCE,
    SCORE,
    SOURCE,
)
from .config import PipelineConfig, load_config
from .device import cuda_available, resolve_device
from .errors import (
    BAD_PARAM,
    MISSING_COLUMN,
    MISSING_EXTRA,
    WRONG_TYPE,
    ArtifactError,
    ConfigError,
    DataError,
    DependencyError,
    DeviceError,
    FunnelError,
    FunnelWarning,
    SchemaError,
)
from .extras import require_extra
from .registry import ENTRY_POINT_GROUP, available_stages, get_stage_class, register_stage
from .schema import ANY, EMBEDDING, keep_input_types
from .stage import Pipeline, Stage, StageStats, StageTags

__version__ = "0.1.0"

__all__ = [
    "Stage", "StageTags", "ANY", "EMBEDDING", "keep_input_types", "resolve_device", "cuda_available",
    "BuildContext", "find_upstream",
    "QUERY_ID", "QUERY", "HISTORY", "QUERY_EMBEDDING", "ITEM_ID", "SCORE", "RANK", "SOURCE", "RECALL_SCORE",
    "RECALL_RANK", "RELEVANCE",
    "Pipeline", "StageStats", "PipelineConfig", "load_config",
    "register_stage", "get_stage_class", "available_stages", "ENTRY_POINT_GROUP",
    "FunnelError", "SchemaError", "ConfigError", "ArtifactError", "DataError", "DeviceError", "DependencyError",
    "MISSING_COLUMN", "WRONG_TYPE", "BAD_PARAM", "MISSING_EXTRA", "require_extra", "FunnelWarning",
    "__version__",
]
