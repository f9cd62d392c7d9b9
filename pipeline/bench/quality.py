"""Quality: the candidates after every stage, Recall@k per stage, the final metrics, and agreement
with the bare baseline's top-N lists."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ..columns import ITEM_ID, QUERY_ID, RANK, SCORE
from ..stage import Pipeline
from .timing import progress_bar

__all__ = ["candidate_tables", "agreement", "quality"]


def candidate_tables(pipe: Pipeline, batches: list[pa.Table], bare, progress: bool):
    """One untimed pass that keeps what quality needs: (query_id, item_id, score, rank) after each
    candidate stage, the input embeddings of each FAISS stage, and the bare pipeline's output."""
    outputs: dict[int, list[pa.Table]] = {}
    embeddings: dict[int, list[np.ndarray]] = {}
    faiss_steps = {i: s.embedding_column for i, s in enumerate(pipe.stages) if s.name == "recall.faiss"}
    keep = [QUERY_ID, ITEM_ID, SCORE, RANK]

    def grab_embeddings(step: int, table: pa.Table) -> None:
        col = faiss_steps.get(step)
        if col is not None and col in table.column_names:
            arr = table.column(col).combine_chunks()
            flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
            embeddings.setdefault(step, []).append(flat.astype(np.float32).reshape(len(arr), -1))

    def observe(step: int, table: pa.Table) -> None:
        grab_embeddings(step + 1, table)
        if all(c in table.column_names for c in keep):
            outputs.setdefault(step, []).append(table.select(keep))

    bare_out = []
    with progress_bar(len(batches), "quality pass", progress) as bar:
        for batch in batches:
            grab_embeddings(0, batch)
            pipe.run(batch, observer=observe)
            if bare is not None:
                bare_out.append(bare.run(pl.from_arrow(batch)))
            bar.update()
    tables = {i: pa.concat_tables(t) for i, t in outputs.items()}
    vectors = {i: np.vstack(v) for i, v in embeddings.items()}
    return tables, vectors, (pl.concat(bare_out) if bare_out else None)


def _top_lists(frame: pl.DataFrame) -> pl.DataFrame:
    return (frame.select(pl.col(QUERY_ID).cast(pl.String), pl.col(ITEM_ID).cast(pl.String), RANK)
            .sort([QUERY_ID, RANK]).group_by(QUERY_ID, maintain_order=True).agg(pl.col(ITEM_ID)))


def agreement(funnel: pa.Table, bare: pl.DataFrame) -> float:
    a, b = _top_lists(pl.from_arrow(funnel)), _top_lists(bare)
    joined = a.join(b, on=QUERY_ID, how="full", suffix="_bare")
    same = joined.select((pl.col(ITEM_ID) == pl.col(f"{ITEM_ID}_bare")).fill_null(False)).to_series()
    return float(same.mean()) if len(same) else float("nan")


def quality(tables: dict[int, pa.Table], judgments: pa.Table | None, final_step: int, top: int) -> tuple[dict, dict]:
    from ..metrics import evaluate

    per_stage: dict[int, dict] = {}
    final: dict = {}
    if judgments is None:
        return per_stage, final
    for step, table in tables.items():
        k = int(pl.from_arrow(table.select([QUERY_ID])).group_by(QUERY_ID).len()["len"].max() or 1)
        res = evaluate(table, judgments, k_values=(k,), metrics=("recall",))
        per_stage[step] = {"k": k, "recall_at_k": res[f"recall@{k}"]}
    if final_step in tables:
        ks = sorted({10, top})
        final = evaluate(tables[final_step], judgments, k_values=ks)
    return per_stage, final
