"""Funnel: multi-stage retrieval and ranking over Apache Arrow.

The public API. Plug-ins and users import from here (or from :mod:`pipeline.testing` for the
conformance kit), never from private modules::

    from pipeline import Stage, StageTags, Pipeline, load_config
"""

from .columns import ITEM_ID, QUERY, QUERY_EMBEDDING, QUERY_ID, RANK, SCORE, SOURCE
from .config import PipelineConfig, load_config
from .device import resolve_device
from .errors import (
    BAD_PARAM,
    MISSING_COLUMN,
    WRONG_TYPE,
    ArtifactError,
    ConfigError,
    DataError,
    DeviceError,
    FunnelError,
    SchemaError,
)
from .registry import ENTRY_POINT_GROUP, available_stages, get_stage_class, register_stage
from .schema import ANY, EMBEDDING
from .stage import Pipeline, Stage, StageStats, StageTags

__version__ = "0.1.0"

__all__ = [
    "Stage", "StageTags", "Pipeline", "StageStats",
    "PipelineConfig", "load_config",
    "register_stage", "get_stage_class", "available_stages", "ENTRY_POINT_GROUP",
    "resolve_device",
    "ANY", "EMBEDDING",
    "FunnelError", "SchemaError", "ConfigError", "ArtifactError", "DataError", "DeviceError",
    "MISSING_COLUMN", "WRONG_TYPE", "BAD_PARAM",
    "QUERY_ID", "QUERY", "QUERY_EMBEDDING", "ITEM_ID", "SCORE", "RANK", "SOURCE",
    "__version__",
]
