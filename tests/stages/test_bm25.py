"""Lexical recall on bm25s: tokenisation, build, search, artifacts, conformance."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ArtifactError, ConfigError, DataError, PipelineConfig
from pipeline.build import build_artifacts
from pipeline.config import load_config
from pipeline.testing import CHECKS, StageCase
from stages.bm25 import BM25Recall, LexicalTokenizer

CATALOG = pa.table({
    "product_id": [10, 11, 12, 13, 14, 15],
    "title": ["DEWALT 20-Volt Max Cordless Drill DCD771C2", "DEWALT 20-Volt Max Cordless Drill DCD777C2",
              "Philips 60-Watt Equivalent A19 LED Light Bulb", "Everbilt 3/4 in. x 10 ft. Copper Pipe",
              "Garden Hose 50 ft.", "Cordless Drills Combo Kit"],
    "brand": ["DEWALT", "DEWALT", "Philips", "Everbilt", None, None],
    "colors": [["Yellow"], ["Yellow", "Black"], None, [], None, ["Red"]],
})


def _shop(tmp_path, **params):
    pq.write_table(CATALOG, tmp_path / "catalog.parquet")
    cfg = PipelineConfig(stages=[{"type": "recall.bm25", "params": {"index": "artifacts/bm25", "k": 3, **params}}],
                         data={"catalog": "catalog.parquet"})
    cfg.save(tmp_path / "p.toml")
    return load_config(tmp_path / "p.toml")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bm25")
    cfg = _shop(root, item_text=["title", "brand", "colors"])
    logs = []
    pipe = build_artifacts(cfg, progress=False, log=logs.append)
    return root, cfg, pipe.stages[0], logs


def test_tokenizer_keeps_model_numbers_and_sizes():
    tok = LexicalTokenizer(stemmer="english")
    assert tok("DCD771C2") == ["dcd771c2", "dcd", "771", "c", "2"]
    assert tok('3/4 in. pipe')[:2] == ["3/4", "in"]
    assert tok("60-Watt") == ["60-watt", "60", "w"] and tok("60 watts") == ["60", "w"]
    assert tok('1-1/2"') == ["1-1/2", "1", "1/2", "in"]
    assert tok("Drills") == ["drill"] and LexicalTokenizer(stemmer=None)("Drills") == ["drills"]
    assert tok(None) == [] and tok("!!!") == []


def test_exact_model_number_ranks_first(built):
    _, _, stage, logs = built
    assert "indexed 6 items" in logs[0]
    out = stage(pa.table({"query_id": [1, 2], "query": ["dewalt drill dcd777c2", "DCD771C2"]}))
    first = {q: i for q, i, r in zip(*(out.column(c).to_pylist() for c in ("query_id", "item_id", "rank"))) if r == 1}
    assert first == {1: 11, 2: 10}
    assert out.column("source").to_pylist() == ["bm25"] * out.num_rows
    scores = out.column("score").to_pylist()
    assert scores[0] >= scores[1] >= scores[2]


def test_sizes_and_list_columns_are_indexed(built):
    stage = built[2]
    out = stage(pa.table({"query_id": [1, 2], "query": ["3/4 copper pipe", "red kit"]})).to_pylist()
    assert [r["item_id"] for r in out if r["query_id"] == 1][0] == 13
    assert [r["item_id"] for r in out if r["query_id"] == 2][0] == 15


def test_queries_without_known_terms_get_fewer_or_no_hits(built):
    stage = built[2]
    out = stage(pa.table({"query_id": [1, 2, 3], "query": ["zzz qqq", "garden", "drill"]}))
    ids = out.column("query_id").to_pylist()
    assert 1 not in ids and ids.count(2) == 1 and ids.count(3) == 3


def test_blank_query_text_is_an_invalid_row(built):
    stage = built[2]
    table = pa.table({"query_id": [1, 2, 3], "query": ["drill", None, "  "]})
    assert stage.invalid_rows(table).to_pylist() == [None, "'query' is null or empty", "'query' is null or empty"]
    with pytest.raises(DataError, match="recall.bm25.*query 2"):
        stage(table)


def test_build_is_cached_and_artifacts_have_no_pickle(built):
    root, cfg, _, logs = built
    build_artifacts(cfg, progress=False, log=logs.append)
    assert "up to date" in logs[-1]
    folder = root / "artifacts" / "bm25"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "bm25" and set(manifest["files"]) >= {"ids.parquet", "vocab.index.json"}
    import numpy as np

    for name in manifest["files"]:
        if name.endswith(".npy"):
            np.load(folder / name, allow_pickle=False)


def test_changed_or_mismatched_index_is_refused(tmp_path):
    cfg = _shop(tmp_path)
    build_artifacts(cfg, progress=False, log=lambda m: None)
    other = BM25Recall(index=str(tmp_path / "artifacts" / "bm25"), stemmer=None)
    with pytest.raises(ArtifactError, match="was built with tokenizer"):
        other.warm_up()
    with open(tmp_path / "artifacts" / "bm25" / "vocab.index.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="corrupted or was changed"):
        BM25Recall(index=str(tmp_path / "artifacts" / "bm25")).warm_up()


def test_bad_params():
    with pytest.raises(ConfigError, match="'k' parameter of stage 'recall.bm25'"):
        BM25Recall(k=0).validate_params()
    with pytest.raises(ConfigError, match="'method' parameter"):
        BM25Recall(method="tfidf").validate_params()
    with pytest.raises(ConfigError, match="'stopwords' parameter"):
        BM25Recall(stopwords="fr").validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_bm25_recall_conforms(built, check):
    stage = built[2].clone()
    queries = pa.table({"query_id": [1, 2, 3], "query": ["cordless drill", "led bulb", "copper pipe 3/4"],
                        "segment": ["a", "b", "c"]})
    CHECKS[check](StageCase(stage, queries))
