"""Several recall sources run on the same queries, fused into one candidate list."""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa

from pipeline.columns import ITEM_ID, QUERY_ID, RANK, SCORE, SOURCE
from pipeline.errors import ConfigError
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Pipeline, Stage, StageTags

__all__ = ["FusedRecall", "METHODS"]

METHODS = ("rrf", "weighted")


class FusedRecall(Stage):
    """Run several recall sources on the same query rows and fuse their candidates.

    Each source is a small pipeline of its own, written as stage specs, so a dense source can
    encode and search while a lexical one searches text directly::

        [[stages]]
        type = "recall.fused"
        [stages.params]
        k = 200
        method = "rrf"
        sources = [
          { name = "dense", weight = 1.0, stages = [
              { type = "encode.sentence_transformers", params = {} },
              { type = "recall.faiss", params = { index = "artifacts/index", k = 100 } } ] },
          { name = "bm25", weight = 1.0, stages = [
              { type = "recall.bm25", params = { index = "artifacts/bm25", k = 100 } } ] },
        ]

    Fusion: ``"rrf"`` scores an item ``sum_s weight_s / (rrf_k + rank_s)`` (reciprocal rank
    fusion); ``"weighted"`` sums ``weight_s * score_s`` after min-max scaling each source's
    scores per query to [0, 1]. The output keeps the best ``k`` per query with ``score`` and
    ``rank`` from the fusion, ``source`` listing every source that found the item
    (``"dense+bm25"``), and ``score_<name>`` / ``rank_<name>`` per source (null where that
    source did not find it) for the ranker. The query's other columns pass through.
    """

    name = "recall.fused"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY)])
    output_schema = pa.schema([pa.field(ITEM_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32()),
                               pa.field(SOURCE, pa.string())])
    tags = StageTags(devices=("cpu", "cuda"), requires_build=True, level="query")

    def __init__(self, sources: list[dict[str, Any]] | None = None, method: str = "rrf", k: int = 100,
                 rrf_k: int = 60, device: str = "auto"):
        self.sources = sources
        self.method = method
        self.k = k
        self.rrf_k = rrf_k
        self.device = device

    # -- sources -----------------------------------------------------------------------------

    def _pipelines(self) -> list[tuple[str, float, Pipeline]]:
        """The sources as (name, weight, pipeline); cheap (stages are built cold, nothing loads)."""
        cached = self.__dict__.get("_built")
        if cached is not None:
            return cached
        from pipeline.config import stage_from_spec

        built = []
        for i, src in enumerate(self.sources or [], start=1):
            where = f"stage '{self.name}': source {i}"
            if not isinstance(src, dict) or not src.get("name") or not src.get("stages"):
                raise ConfigError(f"{where} must be a table with 'name' and 'stages'; got {src!r}")
            extra = set(src) - {"name", "weight", "stages"}
            if extra:
                raise ConfigError(f"{where} has unknown keys {sorted(extra)}; allowed: name, weight, stages")
            weight = src.get("weight", 1.0)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise ConfigError(f"{where} ('{src['name']}'): weight must be a number >= 0; got {weight!r}")
            stages = [stage_from_spec(spec, index=j, base_dir=self._base_dir) for j, spec in enumerate(src["stages"], 1)]
            if self.device != "auto":
                stages = [s.clone(device=self.device) if "device" in s.get_params() and self.device in s.tags.devices
                          else s for s in stages]
            built.append((src["name"], float(weight), Pipeline(stages)))
        self.__dict__["_built"] = built
        return built

    def required_columns(self) -> pa.Schema:
        fields = {QUERY_ID: pa.field(QUERY_ID, ANY)}
        for _, _, pipe in self._pipelines():
            for f in pipe.inputs:
                fields.setdefault(f.name, f)
        return pa.schema(list(fields.values()))

    def produced_columns(self) -> pa.Schema:
        per_source = []
        for name, _, _ in self._pipelines():
            per_source += [pa.field(f"score_{name}", pa.float32()), pa.field(f"rank_{name}", pa.int32())]
        return pa.schema(list(self.output_schema) + per_source)

    def validate_params(self) -> None:
        super().validate_params()
        if not self.sources:
            raise self._bad_param("sources", "a non-empty list of {name, weight, stages} tables")
        names = [s.get("name") for s in self.sources if isinstance(s, dict)]
        if len(set(names)) != len(names):
            raise self._bad_param("sources", "sources with distinct names")
        if self.method not in METHODS:
            raise self._bad_param("method", f"one of {METHODS}")
        for p in ("k", "rrf_k"):
            v = getattr(self, p)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise self._bad_param(p, "an int >= 1")
        for name, _, pipe in self._pipelines():
            out = pipe.output_schema
            missing = [c for c in (ITEM_ID, SCORE, RANK) if c not in out.names]
            if missing:
                raise ConfigError(f"stage '{self.name}': source '{name}' does not produce {', '.join(missing)}")

    # -- build and run -----------------------------------------------------------------------

    def build(self, upstream: Pipeline | None, ctx: Any) -> str:
        lines = []
        for name, _, pipe in self._pipelines():
            for i, stage in enumerate(pipe.stages):
                if hasattr(stage, "build"):
                    sub_up = Pipeline(pipe.stages[:i], inputs=pipe.inputs) if i else None
                    if (line := stage.build(sub_up, ctx)) is not None:
                        lines.append(f"[{name}] " + line)
        return "\n      ".join(lines) or f"{self.name}: nothing to build"

    def warm_up(self) -> None:
        super().warm_up()
        for _, _, pipe in self._pipelines():
            pipe.warm_up()

    def transform(self, table: pa.Table) -> pa.Table:
        query_cols = [c for c in table.column_names if c not in (ITEM_ID, SCORE, RANK, SOURCE)]
        queries = pl.from_arrow(table.select([QUERY_ID])).with_row_index("__qpos")
        parts = []
        for name, weight, pipe in self._pipelines():
            # only the columns the source's stages declare: the others (a history list, say)
            # would be repeated on every candidate row and dropped right after
            needed = {QUERY_ID} | {f.name for s in pipe.stages for f in s.required_columns()}
            got = pipe(table.select([c for c in table.column_names if c in needed]))
            got = pl.from_arrow(got.select([QUERY_ID, ITEM_ID, SCORE, RANK]))
            if self.method == "rrf":
                contrib = weight / (self.rrf_k + pl.col(RANK).cast(pl.Float64))
            else:
                lo, hi = pl.col(SCORE).min().over(QUERY_ID), pl.col(SCORE).max().over(QUERY_ID)
                contrib = weight * pl.when(hi > lo).then((pl.col(SCORE) - lo) / (hi - lo)).otherwise(1.0)
            parts.append(got.with_columns(contrib.alias(f"__contrib_{name}"))
                         .rename({SCORE: f"score_{name}", RANK: f"rank_{name}"}))
        names = [n for n, _, _ in self._pipelines()]
        fused = _fuse_joined(parts, names)
        if fused is None:
            fused = _fuse_grouped(parts, names)
        fused = (fused.with_columns(pl.col(SCORE).cast(pl.Float32))
                 .sort([QUERY_ID, SCORE, ITEM_ID], descending=[False, True, False])
                 .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over(QUERY_ID).alias(RANK))
                 .filter(pl.col(RANK) <= self.k))
        if fused.height:
            fused = fused.with_columns(pl.col(QUERY_ID).cast(queries.schema[QUERY_ID]))
        fused = (queries.join(fused, on=QUERY_ID, how="inner").sort(["__qpos", RANK])
                 .with_columns([pl.col(f"score_{n}").cast(pl.Float32) for n in names]
                               + [pl.col(f"rank_{n}").cast(pl.Int32) for n in names]))
        # the query's columns (a history list, say) taken in Arrow, not converted to Polars and back
        out = table.select(query_cols).take(pa.array(fused["__qpos"].to_numpy().astype("int64")))
        added = fused.select([ITEM_ID, SCORE, RANK, SOURCE] + [c for n in names for c in (f"score_{n}", f"rank_{n}")])
        added = added.to_arrow()
        for name in added.column_names:
            out = out.append_column(added.schema.field(name), added.column(name))
        return keep_input_types(out, table.schema)

def _fuse_joined(parts: list[pl.DataFrame], names: list[str]) -> pl.DataFrame | None:
    """The sources' candidates fused by a full join on (query, item): one row per pair, its
    score the sum of the contributions (in source order), ``source`` the names that found it.
    ``None`` when a source repeats a pair or the sources' key types differ (see
    :func:`_fuse_grouped`)."""
    keys = [QUERY_ID, ITEM_ID]
    if len({tuple(p.schema[k] for k in keys) for p in parts}) > 1:
        return None
    # a hash of the pair: a collision only sends the batch down the (correct) grouped path
    if any(p.select((pl.col(QUERY_ID).hash(1) ^ pl.col(ITEM_ID).hash(2)).is_duplicated().any()).item() for p in parts):
        return None
    fused = parts[0]
    for part in parts[1:]:
        fused = fused.join(part, on=keys, how="full", coalesce=True)
    contribs = [pl.col(f"__contrib_{n}") for n in names]
    total = contribs[0].fill_null(0.0)
    for c in contribs[1:]:
        total = total + c.fill_null(0.0)
    source = pl.concat_str([pl.when(c.is_not_null()).then(pl.lit(n)) for c, n in zip(contribs, names)],
                           separator="+", ignore_nulls=True)
    return fused.with_columns(total.alias(SCORE), source.alias(SOURCE)).drop([f"__contrib_{n}" for n in names])


def _fuse_grouped(parts: list[pl.DataFrame], names: list[str]) -> pl.DataFrame:
    """The general fusion (a source may return an item twice for a query): the sources'
    candidates stacked and grouped by (query, item)."""
    long = pl.concat([p.rename({f"__contrib_{n}": "__contrib"}).with_columns(pl.lit(n).alias("__src"))
                      for p, n in zip(parts, names)], how="diagonal_relaxed")
    return (long.group_by([QUERY_ID, ITEM_ID], maintain_order=True)
            .agg(pl.col("__contrib").sum().alias(SCORE),
                 pl.col("__src").sort_by(pl.col("__src").replace_strict(names, list(range(len(names)))))
                 .str.join("+").alias(SOURCE),
                 *[pl.col(f"score_{n}").drop_nulls().first() for n in names],
                 *[pl.col(f"rank_{n}").drop_nulls().first() for n in names]))
