"""Several recall sources run on the same queries, fused into one candidate list."""

from __future__ import annotations

from typing import Any

import numpy as np
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
        return self.fuse(table, [pipe(table) for _, _, pipe in self._pipelines()])

    def fuse(self, table: pa.Table, found: list[pa.Table]) -> pa.Table:
        """The fused candidates of the query rows ``table``, given each source's output ``found``.

        Each source's contribution is one Polars expression; the grouping by (query, item) is done
        in NumPy on dense codes of the two keys (their sort order is the keys' own): the fused
        score is Polars' sum over one integer group key, the provenance a bit mask per
        candidate, and each source's score and rank are scattered to their candidate (the first
        one where a source lists an item twice).
        """
        names = [n for n, _, _ in self._pipelines()]
        query_cols = [c for c in table.column_names if c not in (ITEM_ID, SCORE, RANK, SOURCE)]
        queries = pl.from_arrow(table.select(query_cols)).with_row_index("__qpos")
        parts = []
        for i, ((name, weight, _), out) in enumerate(zip(self._pipelines(), found)):
            got = pl.from_arrow(out.select([QUERY_ID, ITEM_ID, SCORE, RANK]))
            if self.method == "rrf":
                contrib = weight / (self.rrf_k + pl.col(RANK).cast(pl.Float64))
            else:
                lo, hi = pl.col(SCORE).min().over(QUERY_ID), pl.col(SCORE).max().over(QUERY_ID)
                contrib = weight * pl.when(hi > lo).then((pl.col(SCORE) - lo) / (hi - lo)).otherwise(1.0)
            parts.append(got.select(QUERY_ID, ITEM_ID, pl.col(SCORE).cast(pl.Float32), pl.col(RANK).cast(pl.Int32),
                                    contrib.alias("__contrib"), pl.lit(i, pl.Int64).alias("__src")))
        long = pl.concat(parts, how="vertical_relaxed")
        codes = long.select([(pl.col(c).rank("dense").cast(pl.Int64).fill_null(0)) for c in (QUERY_ID, ITEM_ID)])
        qcode, icode = codes[QUERY_ID].to_numpy(), codes[ITEM_ID].to_numpy()
        _, first, group = np.unique(qcode * (int(icode.max(initial=0)) + 1) + icode, return_index=True,
                                    return_inverse=True)
        n = len(first)
        # Polars' own float sum (it is not a plain left-to-right sum), over one integer key
        score = (pl.DataFrame({"__g": group, "__c": long["__contrib"]}).group_by("__g").agg(pl.col("__c").sum())
                 .sort("__g")["__c"].cast(pl.Float32).to_numpy())
        src = long["__src"].to_numpy()
        mask = np.zeros(n, np.int64)
        np.bitwise_or.at(mask, group, np.left_shift(1, src))
        order = np.lexsort((icode[first], -score, qcode[first]))
        q_sorted = qcode[first][order]
        rank = np.arange(n) - np.searchsorted(q_sorted, q_sorted) + 1
        order, rank = order[rank <= self.k], rank[rank <= self.k]
        labels = pa.array(["+".join(nm for j, nm in enumerate(names) if m >> j & 1) for m in range(1 << len(names))])
        per_source = {}
        src_scores, src_ranks = long[SCORE].to_numpy(), long[RANK].to_numpy()
        for i, name in enumerate(names):
            rows = np.flatnonzero(src == i)[::-1]  # reversed: where a source repeats an item, its first row wins
            value, rnk, have = np.zeros(n, np.float32), np.zeros(n, np.int32), np.zeros(n, bool)
            value[group[rows]], rnk[group[rows]], have[group[rows]] = src_scores[rows], src_ranks[rows], True
            per_source[f"score_{name}"] = pa.array(value[order], pa.float32(), mask=~have[order])
            per_source[f"rank_{name}"] = pa.array(rnk[order], pa.int32(), mask=~have[order])
        keep = pa.array(first[order], pa.int64())
        fused = pl.from_arrow(pa.table({
            QUERY_ID: long[QUERY_ID].to_arrow().take(keep), ITEM_ID: long[ITEM_ID].to_arrow().take(keep),
            SCORE: pa.array(score[order], pa.float32()), RANK: pa.array(rank, pa.int32()),
            SOURCE: labels.take(pa.array(mask[order], pa.int64())), **per_source}))
        if fused.height:
            fused = fused.with_columns(pl.col(QUERY_ID).cast(queries.schema[QUERY_ID]))
        out = queries.join(fused, on=QUERY_ID, how="inner").sort(["__qpos", RANK]).drop("__qpos")
        cols = query_cols + [ITEM_ID, SCORE, RANK, SOURCE] + [c for n in names for c in (f"score_{n}", f"rank_{n}")]
        return keep_input_types(out.select(cols).to_arrow(), table.schema)
