"""Item popularity proxies as ranking features: catalog depth of the brand, attribute richness,
and how many logged queries retrieve the item."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import build_key, read_manifest, read_verified_manifest, sha256_file, write_json_atomic
from pipeline.build import iter_batches, upstream_key
from pipeline.columns import ITEM_ID, QUERY, QUERY_ID, RANK
from pipeline.data import holdout_mask, read_catalog, read_parquet
from pipeline.errors import ArtifactError, DataError
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Pipeline, Stage, StageTags

from .association import SortedIds
from .features import feature_column

__all__ = ["ItemStatsFeatures"]

STATS_FILE = "item_stats.parquet"
BRAND_ITEMS, RETRIEVED_BY = feature_column("brand_items"), feature_column("retrieved_by")


class ItemStatsFeatures(Stage):
    """Add per-item popularity proxies that need no relevance labels, as ``f_*`` features.

    ``funnel build`` computes one row per catalog item into the ``stats`` folder:

    * ``f_brand_items`` — the number of catalog items of the item's brand (0 without a brand):
      shops carry deep ranges of the brands their customers ask for;
    * ``f_n_<column>`` for each list column in ``count_columns`` (colours, materials, ...) —
      how richly the item is described;
    * ``f_retrieved_by`` (when ``depth > 0``) — how many logged queries have the item among the
      first ``depth`` candidates of the stages before this one: how many real search intents the
      item serves. The log is ``[data] queries`` (``query_id``, ``query``) or else the query texts
      of ``[data] judgments``; only texts are read, never relevance labels, and the queries a
      ``holdout_fraction``/``seed`` hash holds out are skipped — keep them equal to the ranker's
      (the defaults are), so the queries a ranker is evaluated on never shape its features.

    At run time the stage joins those columns onto the candidates (0 for an item not in the
    snapshot). Items ranked by these features lean towards the catalog's popular end, which is
    what helps Recall@100 on broad queries ("storage cabinets") where many items match equally.
    """

    name = "features.item_stats"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY)])
    tags = StageTags(requires_build=True, level="candidate")
    path_params = ("stats",)

    def __init__(self, stats: str = "artifacts/item_stats", brand_column: str | None = "brand",
                 count_columns: list[str] | tuple[str, ...] = (), depth: int = 20,
                 holdout_fraction: float = 0.2, seed: int = 0):
        self.stats = stats
        self.brand_column = brand_column
        self.count_columns = count_columns
        self.depth = depth
        self.holdout_fraction = holdout_fraction
        self.seed = seed

    def feature_names(self) -> list[str]:
        names = [BRAND_ITEMS] if self.brand_column else []
        names += [feature_column(f"n_{c}") for c in self.count_columns]
        return names + ([RETRIEVED_BY] if self.depth else [])

    def produced_columns(self) -> pa.Schema:
        return pa.schema([pa.field(f, pa.float32()) for f in self.feature_names()])

    def validate_params(self) -> None:
        super().validate_params()
        if self.brand_column is not None and not isinstance(self.brand_column, str):
            raise self._bad_param("brand_column", "a column name or None")
        if not isinstance(self.count_columns, (list, tuple)) or not all(isinstance(c, str) for c in self.count_columns):
            raise self._bad_param("count_columns", "a list of list-typed catalog column names")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            raise self._bad_param("depth", "an int >= 0 (0: no f_retrieved_by)")
        if not (isinstance(self.holdout_fraction, (int, float)) and 0 <= self.holdout_fraction < 1):
            raise self._bad_param("holdout_fraction", "a number in [0, 1)")
        if not self.feature_names():
            raise self._bad_param("brand_column", "a column name, or count_columns or depth > 0 (no feature to add)")

    # -- build -------------------------------------------------------------------------------

    def _query_log(self, ctx: Any) -> tuple[pa.Table, str]:
        key = "queries" if "queries" in ctx.config.data else "judgments"
        path = ctx.data_path(key)
        table = read_parquet(path, what=f"stage '{self.name}' query log ([data] {key})", columns=[QUERY_ID, QUERY])
        queries = pl.from_arrow(table).unique(QUERY_ID, maintain_order=True).to_arrow()
        held = np.array(holdout_mask(queries.column(QUERY_ID), self.holdout_fraction, self.seed), dtype=bool)
        return queries.filter(pa.array(~held)), sha256_file(path)

    def build(self, upstream: Pipeline | None, ctx: Any) -> str:
        """Compute the statistics; skipped when catalog, query log, parameters and upstream are unchanged."""
        folder = self.resolve_path(self.stats)
        catalog_path = ctx.data_path("catalog")
        columns = [c for c in (self.brand_column, *self.count_columns) if c]
        log, log_sha = self._query_log(ctx) if self.depth else (None, None)
        if self.depth and upstream is None:
            raise DataError(f"stage '{self.name}' with depth={self.depth} needs recall stages before it "
                            "(or set depth = 0)")
        key = build_key(stage=self.name, params=self.get_params(), catalog=sha256_file(catalog_path),
                        log=log_sha, upstream=upstream_key(upstream) if self.depth else None)
        if not ctx.force and (folder / "manifest.json").exists() and read_manifest(folder, what="item stats").get("build_key") == key:
            return f"{self.name}: up to date ({folder})"

        items = pl.from_arrow(read_catalog(catalog_path, columns))
        exprs = []
        if self.brand_column:
            brand = pl.col(self.brand_column)
            exprs.append(pl.when(brand.is_null()).then(0).otherwise(pl.len().over(self.brand_column)).alias(BRAND_ITEMS))
        for c in self.count_columns:
            if not isinstance(items.schema[c], pl.List):
                raise DataError(f"stage '{self.name}': count_columns column '{c}' of {catalog_path} must be a list "
                                f"column, found {items.schema[c]}")
            exprs.append(pl.col(c).list.len().fill_null(0).alias(feature_column(f"n_{c}")))
        stats = items.select([pl.col(ITEM_ID), *exprs])
        if self.depth:
            # streamed: each batch's candidates counted and dropped, the counts (one row per
            # item at most) summed as they come
            counts = pl.DataFrame(schema={ITEM_ID: stats.schema[ITEM_ID], RETRIEVED_BY: pl.UInt32})
            for cands in iter_batches(upstream, log, progress=ctx.progress, desc=f"{self.name}: query log"):
                batch = (pl.from_arrow(cands.select([ITEM_ID, RANK])).filter(pl.col(RANK) <= self.depth)
                         .group_by(ITEM_ID).len(name=RETRIEVED_BY)
                         .with_columns(pl.col(ITEM_ID).cast(stats.schema[ITEM_ID])))
                counts = pl.concat([counts, batch]).group_by(ITEM_ID).agg(pl.col(RETRIEVED_BY).sum())
            stats = stats.join(counts, on=ITEM_ID, how="left")
        stats = stats.with_columns([pl.col(f).fill_null(0).cast(pl.Float32) for f in self.feature_names()])

        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{STATS_FILE}.tmp"
        pq.write_table(stats.to_arrow(), tmp)
        tmp.replace(folder / STATS_FILE)
        write_json_atomic(folder / "manifest.json", {
            "kind": "item-stats", "build_key": key, "features": self.feature_names(), "count": stats.height,
            "log_queries": None if log is None else log.num_rows, "files": {STATS_FILE: sha256_file(folder / STATS_FILE)},
        })
        shown = f", {log.num_rows} logged queries at depth {self.depth}" if log is not None else ""
        return f"{self.name}: {stats.height} items{shown} in {folder}"

    # -- run ---------------------------------------------------------------------------------

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "stats_", None) is not None:
            return
        folder = self.resolve_path(self.stats)
        what = f"stage '{self.name}' stats"
        manifest = read_verified_manifest(folder, what=what)
        if manifest.get("features") != self.feature_names():
            raise ArtifactError(f"{what} in {folder} hold features {manifest.get('features')}, the parameters ask "
                                f"for {self.feature_names()}; run `funnel build`")
        self.stats_ = pl.from_arrow(pq.read_table(folder / STATS_FILE, columns=[ITEM_ID, *self.feature_names()]))
        # integer ids are looked up by binary search (no hash table of the catalog per batch)
        self.sorted_ = SortedIds.of(self.stats_[ITEM_ID].to_arrow())

    def transform(self, table: pa.Table) -> pa.Table:
        names = self.feature_names()
        sorted_ids = getattr(self, "sorted_", None)
        rows = None if sorted_ids is None else sorted_ids.positions(table.column(ITEM_ID))
        if rows is not None:
            out = table.drop_columns([c for c in names if c in table.column_names])
            for name in names:
                got = np.where(rows >= 0, self.stats_[name].to_numpy()[rows], 0.0).astype(np.float32)
                out = out.append_column(pa.field(name, pa.float32()), pa.array(got))
            return keep_input_types(out, table.schema)
        frame = pl.from_arrow(table).drop([c for c in names if c in table.column_names])
        stats = self.stats_
        if stats.schema[ITEM_ID] != frame.schema[ITEM_ID]:
            stats = stats.with_columns(pl.col(ITEM_ID).cast(frame.schema[ITEM_ID]))
        out = frame.join(stats, on=ITEM_ID, how="left", maintain_order="left").with_columns(
            [pl.col(f).fill_null(0.0).cast(pl.Float32) for f in names])
        return keep_input_types(out.to_arrow(), table.schema)
