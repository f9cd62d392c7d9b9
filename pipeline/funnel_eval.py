"""Per-stage recall funnel: after which stage the relevant items of judged queries are lost.

A pipeline narrows a catalog of thousands of items to a shown list of ten or a hundred. When the
final list misses a relevant item, the useful question is *which stage* lost it:

* **not retrieved** — no recall source returned it (the index, tokenisation or embedding
  never brought it up);
* **filtered** — a later stage removed a row that was inside the cut (a rule filter, a brand
  cap, variant de-duplication);
* **ranked below the cut** — it is still there, or was cut off from below, but a stage put it
  at a position beyond ``k``.

:func:`funnel_eval` runs the pipeline over judged queries with an observer
(``Pipeline.run(observer=...)``) and keeps, for every candidate-level stage (from recall on),
the position of every judged relevant item (relevance ``>= relevant_threshold``) in that stage's
output: its order by ``rank`` within the query, or its row order where there is no rank. An item
is *in the cut* at ``k`` when that position is ``<= k``. Recall@k after a stage is the mean over
queries (with at least one relevant item) of the share of relevant items in the cut — the same
definition as ``funnel eval``'s ranx recall, so the last stage's value equals it.

Each item missing from the final cut is blamed on one stage: the last stage at which it left
the cut (``filtered`` if that stage removed it, ``ranked below the cut`` if it only moved it
down); or, if it was never in the cut, the last *scoring* stage (one that writes ``score``: a
recall source, a ranker) that had it — the last one that could have put it higher — as
``ranked below the cut``; or, if no stage ever had it, the first candidate-level stage (``not
retrieved``). ``R@all`` is the recall of everything a stage outputs, whatever its position: for
a recall stage, the ceiling of what the stages after it can reach.

A **long-tail view** buckets the queries by the catalog frequency of their rarest term (how many
catalog items contain it, with the lexical tokeniser of ``recall.bm25``), in equal-count
buckets (quartiles by default), and reports recall per bucket after the first recall stage and
after the last stage: rare-term queries are where dense recall tends to fail and lexical recall
to help.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import polars as pl
import pyarrow as pa

from .columns import ITEM_ID, QUERY, QUERY_ID, RANK, RELEVANCE, SCORE
from .errors import DataError
from .metrics import _numeric_relevance
from .stage import Pipeline, StageStats

__all__ = ["FunnelReport", "funnel_eval", "REASONS", "term_frequencies"]

NOT_RETRIEVED, FILTERED, BELOW_CUT = "not retrieved", "filtered", "ranked below the cut"
REASONS = (NOT_RETRIEVED, FILTERED, BELOW_CUT)
_SOURCE_RANK = re.compile(r"^rank_(.+)$")


@dataclass
class FunnelReport:
    """What :func:`funnel_eval` found; :meth:`to_text` prints it, :meth:`to_dict` is the JSON.

    Attributes:
        ks: the cut-offs.
        stages: one dict per pipeline stage: ``step`` (1-based), ``stage``, ``level``
            (``"query"`` before recall, ``"candidate"`` after), ``rows_in``/``rows_out``,
            ``seconds``, and for candidate stages ``recall_all`` (recall of the whole output),
            ``recall`` (``{k: recall}``), ``lost``
            (``{k: {reason: items blamed on this stage}}``) and, after ``recall.fused``,
            ``source_recall`` (``{source: {k: recall of that source's own top-k}}``).
        lost: one row per (query, item, k) missing from the final cut: ``query_id``, ``item_id``,
            ``k``, ``step``, ``stage``, ``reason``.
        long_tail: one dict per bucket: ``bucket``, ``queries``, ``min_df``/``max_df`` (catalog
            frequency of the rarest term), ``recall_first``/``recall_last`` (``{k: recall}``).
    """

    ks: list[int]
    queries: int
    queries_relevant: int
    relevant_items: int
    stages: list[dict[str, Any]]
    lost: pl.DataFrame
    long_tail: list[dict[str, Any]] = field(default_factory=list)
    quarantined: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ks": self.ks, "queries": self.queries, "queries_relevant": self.queries_relevant,
            "relevant_items": self.relevant_items, "quarantined": self.quarantined,
            "stages": [{k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in s.items()}
                       for s in self.stages],
            "long_tail": [{k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in b.items()}
                          for b in self.long_tail],
            "lost": self.lost.to_dicts(),
        }

    def to_text(self) -> str:
        ks = self.ks
        head = f"{'step':<4} {'stage':<26} {'rows out':>9} {'s':>7} {'R@all':>7}" + "".join(f" {'R@' + str(k):>7}" for k in ks)
        for k in ks:
            head += f"  | lost@{k}: {'not retr.':>9} {'filtered':>8} {'below cut':>9}"
        lines = [head, "-" * len(head)]
        shown_sources = None
        for s in self.stages:
            line = f"{s['step']:<4} {s['stage'][:26]:<26} {s['rows_out']:>9} {s['seconds']:>7.1f}"
            if s["level"] != "candidate":
                lines.append(line)
                continue
            line += f" {s['recall_all']:>7.3f}" + "".join(f" {s['recall'][k]:>7.3f}" for k in ks)
            for k in ks:
                lost = s["lost"][k]
                line += f"  | {'':>{len(f'lost@{k}:')}} {lost[NOT_RETRIEVED]:>9} {lost[FILTERED]:>8} {lost[BELOW_CUT]:>9}"
            lines.append(line)
            if s.get("source_recall") and s.get("source_recall") != shown_sources:
                shown_sources = s["source_recall"]
                for src, rec in shown_sources.items():
                    lines.append(f"{'':<4} {'  └ ' + src + ' alone':<26} {'':>9} {'':>7} {'':>7}"
                                 + "".join(f" {rec[k]:>7.3f}" for k in ks))
        lines.append(f"R@k: recall of the {self.relevant_items} relevant judged items ({self.queries_relevant} queries) "
                     "within the first k rows after each stage (R@all: anywhere in its output);")
        lines.append("lost@k: the items missing from the final top k, each blamed on one stage (see pipeline/funnel_eval.py)")
        if self.quarantined:
            lines.append(f"{self.quarantined} row(s) were quarantined by a stage (counted as dropped there)")
        if self.long_tail:
            lines.append("")
            lines.append("long tail: queries by catalog frequency of their rarest term")
            head = f"{'bucket':<8} {'queries':>7} {'rarest-term df':>15}" + "".join(
                f" {'R@' + str(k) + ' recall':>12} {'R@' + str(k) + ' final':>11}" for k in ks)
            lines += [head, "-" * len(head)]
            for b in self.long_tail:
                line = f"{b['bucket']:<8} {b['queries']:>7} {str(b['min_df']) + '-' + str(b['max_df']):>15}"
                line += "".join(f" {b['recall_first'][k]:>12.3f} {b['recall_last'][k]:>11.3f}" for k in ks)
                lines.append(line)
        return "\n".join(lines)


def _strings(frame: pl.DataFrame, *cols: str) -> pl.DataFrame:
    return frame.with_columns(pl.col(c).cast(pl.String) for c in cols)


def _relevant(judgments: pa.Table | pl.DataFrame, threshold: float) -> pl.DataFrame:
    frame = judgments if isinstance(judgments, pl.DataFrame) else pl.from_arrow(judgments)
    if ITEM_ID not in frame.columns and "product_id" in frame.columns:
        frame = frame.rename({"product_id": ITEM_ID})
    missing = [c for c in (QUERY_ID, ITEM_ID, RELEVANCE) if c not in frame.columns]
    if missing:
        raise DataError(f"funnel evaluation needs column(s) {', '.join(missing)} in the judgments; "
                        f"they have: {', '.join(frame.columns)}")
    frame = _strings(frame, QUERY_ID, ITEM_ID).with_columns(_numeric_relevance(frame[RELEVANCE], "judgments"))
    frame = frame.group_by([QUERY_ID, ITEM_ID], maintain_order=True).agg(pl.col(RELEVANCE).mean())
    return frame.filter(pl.col(RELEVANCE).round(2) >= threshold - 1e-9).select(QUERY_ID, ITEM_ID)


def term_frequencies(texts: Iterable[str | None], tokenizer=None) -> dict[str, int]:
    """Document frequency of every token over ``texts`` (the catalog), by ``recall.bm25``'s tokeniser."""
    from collections import Counter

    if tokenizer is None:
        from stages.bm25 import LexicalTokenizer

        tokenizer = LexicalTokenizer()
    df: Counter[str] = Counter()
    for text in texts:
        df.update(set(tokenizer(text)))
    return dict(df)


class _Observer:
    """Keeps, per candidate stage, the position of each relevant (query, item) in the stage output."""

    def __init__(self, relevant: pl.DataFrame, max_k: int):
        self.relevant = relevant
        self.max_k = max_k
        self.seen: dict[int, list[pl.DataFrame]] = {}
        self.sources: dict[int, list[str]] = {}
        self.rows: dict[int, int] = {}

    def __call__(self, step: int, table: pa.Table) -> None:
        self.rows[step] = self.rows.get(step, 0) + table.num_rows
        if ITEM_ID not in table.column_names or QUERY_ID not in table.column_names:
            return
        src_cols = [c for c in table.column_names if _SOURCE_RANK.match(c) and f"score_{c[5:]}" in table.column_names]
        self.sources[step] = [c[5:] for c in src_cols]
        cols = [QUERY_ID, ITEM_ID] + ([RANK] if RANK in table.column_names else []) + src_cols
        frame = _strings(pl.from_arrow(table.select(cols)), QUERY_ID, ITEM_ID).with_row_index("__row")
        order = [RANK, "__row"] if RANK in frame.columns else ["__row"]
        frame = frame.sort(order).with_columns(pl.int_range(1, pl.len() + 1).over(QUERY_ID).alias("__pos"))
        frame = frame.join(self.relevant, on=[QUERY_ID, ITEM_ID], how="semi")
        self.seen.setdefault(step, []).append(frame.select(QUERY_ID, ITEM_ID, "__pos", *src_cols))


def _recall(relevant: pl.DataFrame, hits: pl.DataFrame) -> float:
    """Mean over queries of the share of their relevant items found in ``hits`` (query_id, item_id)."""
    if relevant.height == 0:
        return float("nan")
    found = relevant.join(hits.unique([QUERY_ID, ITEM_ID]).with_columns(pl.lit(True).alias("__hit")),
                          on=[QUERY_ID, ITEM_ID], how="left")
    per_q = found.group_by(QUERY_ID).agg(pl.col("__hit").fill_null(False).mean())
    return float(per_q["__hit"].mean())


def funnel_eval(pipe: Pipeline, queries: pa.Table | str | Path, judgments: pa.Table | pl.DataFrame | str | Path, *,
                ks: Iterable[int] = (100,), relevant_threshold: float = 2.67, batch_size: int = 256,
                progress: bool = True, catalog_texts: Iterable[str | None] | None = None,
                buckets: int = 4) -> FunnelReport:
    """Run ``pipe`` on the judged ``queries`` and attribute every lost relevant item to a stage.

    ``queries`` and ``judgments`` are tables or Parquet paths (judgments may call the item
    ``product_id``). Rows a stage cannot process are quarantined (and so count as dropped by
    that stage). ``catalog_texts`` (one text per catalog item, e.g. titles) enables the
    long-tail view with ``buckets`` equal-count buckets. See the module docstring.
    """
    from tqdm.auto import tqdm

    from .data import open_dataset, read_parquet
    from .schema import check_columns

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise DataError(f"funnel evaluation needs cut-offs k >= 1; got {ks}")
    if not isinstance(judgments, (pa.Table, pl.DataFrame)):
        judgments = read_parquet(judgments, what="judgments")
    relevant = _relevant(judgments, relevant_threshold)
    if isinstance(queries, pa.Table):
        batches: Iterable[pa.RecordBatch | pa.Table] = (queries.slice(i, batch_size)
                                                         for i in range(0, queries.num_rows, batch_size))
        total, query_table = queries.num_rows, queries
    else:
        dataset = open_dataset(queries)
        check_columns(pipe.inputs, dataset.schema, stage=pipe.stages[0].name, where=f"queries file {queries}")
        batches, total = dataset.to_batches(batch_size=batch_size), dataset.count_rows()
        query_table = dataset.to_table(columns=[c for c in (QUERY_ID, QUERY) if c in dataset.schema.names])
    asked = _strings(pl.from_arrow(query_table.select([QUERY_ID])), QUERY_ID)
    relevant = relevant.join(asked, on=QUERY_ID, how="semi")

    observer = _Observer(relevant, ks[-1])
    stats: list[StageStats] = []
    quarantine: list[pa.Table] = []
    pipe.warm_up()
    with tqdm(total=total, desc="funnel", unit="q", disable=not progress) as bar:
        for batch in batches:
            if batch.num_rows:
                pipe.run(batch, stats, observer, quarantine=quarantine)
                bar.update(batch.num_rows)
    if not stats:
        stats = [StageStats(s.name) for s in pipe.stages]

    cand_steps = sorted(observer.seen)
    seen = {step: pl.concat(observer.seen[step], how="diagonal_relaxed") for step in cand_steps}
    stages_out: list[dict[str, Any]] = []
    for i, (stage, st) in enumerate(zip(pipe.stages, stats)):
        row: dict[str, Any] = {"step": i + 1, "stage": stage.name, "level": "candidate" if i in seen else "query",
                               "rows_in": st.rows_in, "rows_out": st.rows_out, "seconds": round(st.total_seconds, 3)}
        if i in seen:
            row["recall_all"] = _recall(relevant, seen[i])
            row["recall"] = {k: _recall(relevant, seen[i].filter(pl.col("__pos") <= k)) for k in ks}
            row["lost"] = {k: dict.fromkeys(REASONS, 0) for k in ks}
            src = {name: {k: _recall(relevant, seen[i].filter(pl.col(f"rank_{name}") <= k)) for k in ks}
                   for name in observer.sources.get(i, [])}
            if src:
                row["source_recall"] = src
        stages_out.append(row)

    lost_parts = []
    if cand_steps and relevant.height:
        # state per (query, item, step): 0 absent, 1 present beyond the cut, 2 within the cut
        base = relevant.with_row_index("__pair")
        pos = np.zeros((relevant.height, len(cand_steps)), dtype=np.int64)
        for j, step in enumerate(cand_steps):
            got = base.join(seen[step].unique([QUERY_ID, ITEM_ID]), on=[QUERY_ID, ITEM_ID], how="inner")
            pos[got["__pair"].to_numpy(), j] = got["__pos"].to_numpy()
        present = pos > 0
        scoring = np.array([SCORE in pipe.stages[step].produced_columns().names for step in cand_steps])
        for k in ks:
            state = np.where(present, np.where(pos <= k, 2, 1), 0)
            lost_rows = np.flatnonzero(state[:, -1] < 2)
            steps, reasons = [], []
            for r in lost_rows:
                s = state[r]
                left = [j for j in range(1, len(s)) if s[j - 1] == 2 and s[j] < 2]
                if left:
                    j = left[-1]
                    reason = FILTERED if s[j] == 0 else BELOW_CUT
                elif s.any():
                    had = np.flatnonzero(s)
                    scored = had[scoring[had]]
                    j, reason = int(scored[-1] if len(scored) else had[-1]), BELOW_CUT
                else:
                    j, reason = 0, NOT_RETRIEVED
                steps.append(cand_steps[j])
                reasons.append(reason)
                stages_out[cand_steps[j]]["lost"][k][reason] += 1
            lost_parts.append(base[lost_rows].select(QUERY_ID, ITEM_ID).with_columns(
                pl.lit(k).alias("k"), pl.Series("step", [s + 1 for s in steps], dtype=pl.Int64),
                pl.Series("stage", [pipe.stages[s].name for s in steps], dtype=pl.String),
                pl.Series("reason", reasons, dtype=pl.String)))
    lost = (pl.concat(lost_parts) if lost_parts else
            pl.DataFrame(schema={QUERY_ID: pl.String, ITEM_ID: pl.String, "k": pl.Int32, "step": pl.Int64,
                                 "stage": pl.String, "reason": pl.String}))

    long_tail: list[dict[str, Any]] = []
    if catalog_texts is not None and cand_steps and relevant.height and QUERY in query_table.column_names:
        long_tail = _long_tail(query_table, relevant, seen, cand_steps, ks, catalog_texts, buckets)
    return FunnelReport(ks=ks, queries=asked[QUERY_ID].n_unique(), queries_relevant=relevant[QUERY_ID].n_unique(),
                        relevant_items=relevant.height, stages=stages_out, lost=lost, long_tail=long_tail,
                        quarantined=sum(t.num_rows for t in quarantine))


def _long_tail(query_table: pa.Table, relevant: pl.DataFrame, seen: dict[int, pl.DataFrame], cand_steps: list[int],
               ks: list[int], catalog_texts: Iterable[str | None], buckets: int) -> list[dict[str, Any]]:
    from stages.bm25 import LexicalTokenizer

    tokenizer = LexicalTokenizer()
    df = term_frequencies(catalog_texts, tokenizer)
    queries = _strings(pl.from_arrow(query_table.select([QUERY_ID, QUERY])), QUERY_ID).unique(QUERY_ID, maintain_order=True)
    queries = queries.join(relevant.select(QUERY_ID).unique(), on=QUERY_ID, how="semi")
    rarest = [min((df.get(t, 0) for t in tokenizer(text)), default=0) for text in queries[QUERY].to_list()]
    queries = queries.with_columns(pl.Series("__df", rarest, dtype=pl.Int64)).sort(["__df", QUERY_ID])
    out = []
    for b, idx in enumerate(np.array_split(np.arange(queries.height), max(1, min(buckets, queries.height))), start=1):
        part = queries[idx]
        rel = relevant.join(part.select(QUERY_ID), on=QUERY_ID, how="semi")
        first, last = seen[cand_steps[0]], seen[cand_steps[-1]]
        out.append({"bucket": f"Q{b}", "queries": part.height, "min_df": int(part["__df"].min()),
                    "max_df": int(part["__df"].max()),
                    "recall_first": {k: _recall(rel, first.filter(pl.col("__pos") <= k)) for k in ks},
                    "recall_last": {k: _recall(rel, last.filter(pl.col("__pos") <= k)) for k in ks}})
    return out
