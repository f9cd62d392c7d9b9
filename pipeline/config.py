"""Pipelines as TOML files.

A config is a list of stages, each a registry ``type`` and its ``params``; an optional
``[pipeline]`` table names the pipeline and declares its input columns, and an optional
``[data]`` table names the files ``funnel build`` learns from::

    [pipeline]
    name = "demo"
    inputs = { query_id = "any", query = "string" }

    [data]
    catalog = "data/catalog.parquet"       # product_id/item_id, title, attributes
    judgments = "data/judgments.parquet"   # query_id, query, item id, relevance

    [[stages]]
    type = "encode.sentence_transformers"
    params = { text_column = "query" }

    [[stages]]
    type = "recall.faiss"
    params = { index = "artifacts/index", k = 100 }

Loading gives exactly the objects the Python API builds (``Pipeline([...])``), and saving
writes every parameter explicitly so a saved config says what runs: ``load → save → load``
yields equal pipelines and ``save`` is a fixed point. Values are parsed as TOML data and passed
to ``__init__``; nothing in a config is ever evaluated as code.

Relative paths in ``[data]`` are read relative to the config file's folder. Relative artifact
paths in stage parameters must stay inside that folder (write an absolute path to leave it).

Versions: ``{version}`` in a stage parameter (``index = "artifacts/{version}/association"``) is
replaced by ``[pipeline] version`` or the ``--version`` option of ``funnel build`` / ``run``, so
each build of new data writes a folder of its own and an older version stays loadable
(rollback). ``[data] logs`` names interaction logs (``user_id``, ``items`` in time order) that
recommendation stages learn from; ``funnel build --logs FILE`` replaces it for one build.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import tomli_w

from .errors import ConfigError
from .registry import get_stage_class
from .schema import ANY, EMBEDDING
from .stage import Pipeline, Stage

__all__ = ["PipelineConfig", "load_config", "stage_from_spec", "stage_to_spec", "TYPE_NAMES"]

#: Type names usable in ``[pipeline] inputs``.
TYPE_NAMES: dict[str, pa.DataType] = {
    "any": ANY,
    "string": pa.string(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "list<string>": pa.list_(pa.string()),
    "list<int64>": pa.list_(pa.int64()),
    "embedding": EMBEDDING,
}
_NAME_OF = {str(v): k for k, v in TYPE_NAMES.items() if k != "any"}

_TOP_KEYS = {"pipeline", "data", "stages"}
_PIPELINE_KEYS = {"name", "inputs", "batch_size", "version"}
#: ``{version}`` in a stage parameter is replaced by the config's version (``[pipeline] version``
#: or ``--version``), so each build can write its artifacts to a folder of its own.
VERSION_FIELD = "{version}"
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _uses_version(value: Any) -> bool:
    if isinstance(value, str):
        return VERSION_FIELD in value
    if isinstance(value, dict):
        return any(_uses_version(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_uses_version(v) for v in value)
    return False


def _fill_version(value: Any, version: str) -> Any:
    if isinstance(value, str):
        return value.replace(VERSION_FIELD, version)
    if isinstance(value, dict):
        return {k: _fill_version(v, version) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fill_version(v, version) for v in value]
    return value


def stage_from_spec(spec: dict[str, Any], *, index: int, base_dir: Path | None = None) -> Stage:
    """Build one stage from ``{"type": ..., "params": {...}}``; errors name the step."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"stage {index} of the config has no 'type' (got {spec!r})")
    extra = set(spec) - {"type", "params"}
    if extra:
        raise ConfigError(f"stage {index} ('{spec['type']}') has unknown keys {sorted(extra)}; allowed: type, params")
    cls = get_stage_class(spec["type"])
    params = spec.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"stage {index} ('{spec['type']}'): params must be a table; got {params!r}")
    allowed = cls._param_names()
    unknown = set(params) - set(allowed)
    if unknown:
        raise ConfigError(
            f"stage {index} ('{spec['type']}') has no parameter(s) {', '.join(sorted(unknown))}; "
            f"its parameters are: {', '.join(allowed)}"
        )
    try:
        stage = cls(**params)
    except TypeError as exc:
        raise ConfigError(f"stage {index} ('{spec['type']}'): {exc}") from exc
    stage._base_dir = base_dir
    return stage


def _toml_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_toml_value(v) for v in value]
    if isinstance(value, list):
        return [_toml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _toml_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, Path):
        return str(value)
    return value


def stage_to_spec(stage: Stage) -> dict[str, Any]:
    """``{"type": name, "params": every parameter}`` (``None`` values are left out: TOML has no null)."""
    params = {k: _toml_value(v) for k, v in stage.get_params().items() if v is not None}
    return {"type": stage.name, "params": params}


@dataclass
class PipelineConfig:
    """A parsed config: stage specs plus the optional pipeline and data tables."""

    stages: list[dict[str, Any]]
    name: str = "pipeline"
    inputs: dict[str, str] | None = None
    data: dict[str, str] = field(default_factory=dict)
    batch_size: int | None = None
    base_dir: Path | None = None
    version: str | None = None

    # -- objects -----------------------------------------------------------------------------

    def input_schema(self) -> pa.Schema | None:
        if self.inputs is None:
            return None
        fields = []
        for col, tname in self.inputs.items():
            if tname not in TYPE_NAMES:
                raise ConfigError(f"[pipeline] inputs: column '{col}' has unknown type {tname!r}; known: {', '.join(TYPE_NAMES)}")
            fields.append(pa.field(col, TYPE_NAMES[tname]))
        return pa.schema(fields)

    def build(self) -> Pipeline:
        """The :class:`Pipeline` this config describes (schemas checked, nothing loaded).

        ``{version}`` in stage parameters (artifact folders) is replaced by :attr:`version` first.
        """
        stages = [stage_from_spec(s, index=i, base_dir=self.base_dir) for i, s in enumerate(self.versioned_stages(), start=1)]
        return Pipeline(stages, inputs=self.input_schema())

    def uses_version(self) -> bool:
        """Whether any stage parameter contains ``{version}``."""
        return _uses_version(self.stages)

    def versioned_stages(self) -> list[dict[str, Any]]:
        """The stage specs with ``{version}`` replaced by :attr:`version`."""
        if not self.uses_version():
            return self.stages
        if self.version is None:
            raise ConfigError("stage parameters use {version} but the config sets no version; "
                              "add [pipeline] version = \"...\" or pass --version NAME")
        if self.version != VERSION_FIELD and not _VERSION_NAME.fullmatch(self.version):
            raise ConfigError(f"version {self.version!r} is not a valid name; use letters, digits, '.', '_' and '-' "
                              "(starting with a letter or digit)")
        return [_fill_version(s, self.version) for s in self.stages]

    def data_path(self, key: str) -> Path:
        """A ``[data]`` entry as an absolute path (input data may live anywhere)."""
        if key not in self.data:
            raise ConfigError(f"the config has no [data] {key} = \"...\" entry, which this command needs")
        p = Path(self.data[key])
        return p if p.is_absolute() else ((self.base_dir or Path.cwd()) / p).resolve()

    @classmethod
    def from_pipeline(cls, pipe: Pipeline, *, name: str = "pipeline", data: dict[str, str] | None = None,
                      inputs: dict[str, str] | None = None) -> "PipelineConfig":
        if inputs is None:
            inputs = {f.name: ("any" if f.type == ANY else _NAME_OF.get(str(f.type), "any")) for f in pipe.inputs}
        base = next((s._base_dir for s in pipe.stages if s._base_dir is not None), None)
        return cls(stages=[stage_to_spec(s) for s in pipe.stages], name=name, inputs=inputs, data=dict(data or {}), base_dir=base)

    # -- text --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        head: dict[str, Any] = {"name": self.name}
        if self.batch_size is not None:
            head["batch_size"] = self.batch_size
        if self.version is not None:
            head["version"] = self.version
        if self.inputs is not None:
            head["inputs"] = dict(self.inputs)
        out: dict[str, Any] = {"pipeline": head}
        if self.data:
            out["data"] = dict(self.data)
        out["stages"] = [_toml_value(s) for s in self.stages]
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, base_dir: Path | None = None, source: str = "config") -> "PipelineConfig":
        unknown = set(doc) - _TOP_KEYS
        if unknown:
            raise ConfigError(f"{source}: unknown top-level table(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
        head = doc.get("pipeline", {})
        bad = set(head) - _PIPELINE_KEYS
        if bad:
            raise ConfigError(f"{source}: unknown key(s) {sorted(bad)} in [pipeline]; allowed: {sorted(_PIPELINE_KEYS)}")
        stages = doc.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"{source}: no [[stages]] entries; a pipeline needs at least one stage")
        return cls(
            stages=stages, name=head.get("name", "pipeline"), inputs=head.get("inputs"),
            data=doc.get("data", {}), batch_size=head.get("batch_size"), base_dir=base_dir, version=head.get("version"),
        )

    @classmethod
    def normalised(cls, cfg: "PipelineConfig") -> "PipelineConfig":
        """The same config with every stage parameter written out (what ``save`` writes).

        ``{version}`` in parameters stays as it is.
        """
        pipe = dataclasses.replace(cfg, version=VERSION_FIELD).build() if cfg.uses_version() else cfg.build()
        out = cls.from_pipeline(pipe, name=cfg.name, data=cfg.data, inputs=cfg.inputs)
        out.batch_size, out.base_dir, out.version = cfg.batch_size, cfg.base_dir, cfg.version
        return out


def load_config(path: str | Path) -> PipelineConfig:
    """Parse a TOML config file (errors name the file and the problem)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from exc
    return PipelineConfig.from_dict(doc, base_dir=path.resolve().parent, source=f"config file {path}")


def default_params(cls: type[Stage]) -> dict[str, Any]:
    """The defaults of a stage class' parameters (``inspect.Parameter.empty`` when required)."""
    sig = inspect.signature(cls.__init__)
    return {n: sig.parameters[n].default for n in cls._param_names()}
