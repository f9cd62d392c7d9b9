"""`funnel build` of a FAISS recall stage: from catalog text or from an embeddings file."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ArtifactError, PipelineConfig
from pipeline.build import build_artifacts
from pipeline.config import load_config


def _config(root, data, index="artifacts/index"):
    cfg = PipelineConfig(
        stages=[{"type": "encode.sentence_transformers", "params": {}},
                {"type": "recall.faiss", "params": {"index": index, "k": 3, "item_text": ["title", "colors"]}}],
        data=data)
    cfg.save(root / "p.toml")
    return load_config(root / "p.toml")


def test_build_from_catalog_with_list_columns_then_search(tmp_path):
    pq.write_table(pa.table({
        "product_id": [10, 11, 12, 13],
        "title": ["cordless drill", "garden hose", "LED bulb", "paint roller"],
        "colors": [["red"], None, ["white", "warm white"], []],
    }), tmp_path / "catalog.parquet")
    cfg = _config(tmp_path, {"catalog": "catalog.parquet"})
    logs = []
    pipe = build_artifacts(cfg, progress=False, log=logs.append)
    assert logs[0].startswith("recall.faiss: encoding 4 catalog items (title, colors)") and "indexed 4 items" in logs[1]
    out = pipe(pa.table({"query_id": [1], "query": ["drill"]}))
    assert out.column("item_id").to_pylist()[0] == 10 and out.column("rank").to_pylist() == [1, 2, 3]
    build_artifacts(cfg, progress=False, log=logs.append)
    assert "up to date" in logs[-1]


def test_build_from_an_embeddings_file(tmp_path):
    from stages.sentence_transformers import SentenceTransformerEncoder

    texts = ["cordless drill", "garden hose", "LED bulb"]
    emb = SentenceTransformerEncoder().encode_texts(texts)
    pq.write_table(pa.table({"item_id": ["a", "b", "c"], "embedding": list(emb)}), tmp_path / "emb.parquet")
    cfg = _config(tmp_path, {"embeddings": "emb.parquet"})
    pipe = build_artifacts(cfg, progress=False, log=lambda m: None)
    out = pipe(pa.table({"query_id": [1], "query": ["hose for the garden"]}))
    assert out.column("item_id").to_pylist()[0] == "b"


def test_index_built_with_another_encoder_is_refused_at_composition(tmp_path):
    pq.write_table(pa.table({"item_id": [1, 2], "title": ["drill", "hose"], "colors": [None, None]}),
                   tmp_path / "catalog.parquet")
    build_artifacts(_config(tmp_path, {"catalog": "catalog.parquet"}), progress=False, log=lambda m: None)
    from stages.sentence_transformers import resolve_model

    other = PipelineConfig(
        stages=[{"type": "encode.sentence_transformers", "params": {"model": resolve_model("all-MiniLM-L6-v2")[0]}},
                {"type": "recall.faiss", "params": {"index": "artifacts/index", "k": 1}}])
    other.save(tmp_path / "other.toml")
    with pytest.raises(ArtifactError, match="was built with encoder 'all-MiniLM-L6-v2'"):
        load_config(tmp_path / "other.toml").build()
