"""The cross-encoder re-ranker: fine-tuning by `funnel build` on the ranker's training queries only,
safetensors artifacts, re-ordering of the top k, the conformance kit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ArtifactError, ConfigError
from pipeline.build import build_artifacts
from pipeline.config import load_config
from pipeline.demo import demo_config
from pipeline.testing import CHECKS, StageCase

from stages.cross_encoder import CE_SCORE, PREV_SCORE, CrossEncoderReranker, _new_scores

K = 10
#: A 2-layer cross-encoder, a few hundred pairs: seconds of training on 2 CPU cores
CE_PARAMS = {"model": "artifacts/cross_encoder", "k": K, "layers": 2, "epochs": 2.0, "learning_rate": 1e-4,
             "negatives": 6, "max_train_queries": None, "valid_fraction": 0.3, "precision": "fp32"}


def _config(**ce):
    cfg = demo_config()
    stages = [s for s in cfg.stages if s["type"] != "display.topn"]
    stages.append({"type": "rerank.cross_encoder", "params": {**CE_PARAMS, **ce}})
    stages.append({"type": "rank.lightgbm", "params": {"model": "artifacts/ranker-ce", "n_estimators": 100}})
    stages.append({"type": "display.topn", "params": {"n": K}})
    cfg.stages = stages
    return cfg


@pytest.fixture(scope="module")
def ce_shop(demo_shop, tmp_path_factory):
    """The demo shop with a cross-encoder and a second ranker after the first, built."""
    root = tmp_path_factory.mktemp("ce-shop")
    shutil.copytree(demo_shop / "data", root / "data")
    shutil.copytree(demo_shop / "artifacts", root / "artifacts")
    _config().save(root / "pipeline.toml")
    seen = []
    original = CrossEncoderReranker._candidates

    def spy(self, upstream, train_q, ctx):
        seen.extend(train_q.column("query_id").to_pylist())
        return original(self, upstream, train_q, ctx)

    lines = []
    CrossEncoderReranker._candidates = spy
    try:
        build_artifacts(load_config(root / "pipeline.toml"), progress=False, log=lines.append)
    finally:
        CrossEncoderReranker._candidates = original
    return root, seen, lines


@pytest.fixture(scope="module")
def ce_pipeline(ce_shop):
    return load_config(ce_shop[0] / "pipeline.toml").build().warm_up()


@pytest.mark.slow
def test_fine_tuned_cross_encoder_beats_the_untrained_one(ce_shop):
    root, _, lines = ce_shop
    manifest = json.loads((root / "artifacts" / "cross_encoder" / "manifest.json").read_text())
    valid = manifest["valid_ndcg@10"]
    assert valid["fine_tuned"] > valid["untrained"] + 0.05, valid
    assert manifest["layers"] == 2 and manifest["train_pairs"] > 0
    assert any(line.startswith("rerank.cross_encoder: fine-tuned") for line in lines)


@pytest.mark.slow
def test_training_never_reads_the_rankers_holdout(ce_shop):
    root, seen, _ = ce_shop
    held = set(pq.read_table(root / "artifacts" / "ranker" / "holdout_queries.parquet").column("query_id").to_pylist())
    assert seen and held and not held & set(seen)


@pytest.mark.slow
def test_weights_are_safetensors_with_checksums(ce_shop, tmp_path):
    folder = ce_shop[0] / "artifacts" / "cross_encoder"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "model.safetensors" in manifest["files"] and not list(folder.glob("*.bin"))
    copy = tmp_path / "ce"
    shutil.copytree(folder, copy)
    first = CrossEncoderReranker(model=str(copy), precision="fp32", device="cpu")
    pairs = (["drill bits", "red paint"], ["cordless drill bit set", "blue paint can"])
    scores = first.score_pairs(*pairs)
    again = CrossEncoderReranker(model=str(copy), precision="fp32", device="cpu").score_pairs(*pairs)
    np.testing.assert_array_equal(scores, again)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(4096)
        f.write(b"garbage")
    with pytest.raises(ArtifactError, match="corrupted or was changed"):
        CrossEncoderReranker(model=str(copy), device="cpu").warm_up()
    (copy / "pytorch_model.bin").write_bytes(b"x")
    (copy / "model.safetensors").unlink()
    with pytest.raises(ArtifactError):
        CrossEncoderReranker(model=str(copy), device="cpu").warm_up()


@pytest.mark.slow
def test_top_k_reordered_the_rest_kept_below(ce_pipeline, ce_shop):
    step = [s.name for s in ce_pipeline].index("rerank.cross_encoder")
    queries = pq.read_table(ce_shop[0] / "data" / "queries.parquet").slice(0, 6)
    before = ce_pipeline[:step](queries)
    out = ce_pipeline.stages[step](before)
    assert out.num_rows == before.num_rows
    for q in set(out.column("query_id").to_pylist()):
        rows = [r for r in out.to_pylist() if r["query_id"] == q]
        top, rest = rows[:K], rows[K:]
        assert all(r["recall_rank"] <= K for r in top) and all(not np.isnan(r[CE_SCORE]) for r in top)
        assert [r["recall_rank"] for r in rest] == sorted(r["recall_rank"] for r in rest)
        assert all(np.isnan(r[CE_SCORE]) for r in rest)
        assert [r[CE_SCORE] for r in top] == sorted((r[CE_SCORE] for r in top), reverse=True)
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(r[PREV_SCORE] == r["recall_score"] for r in rows)


@pytest.mark.slow
def test_second_ranker_uses_the_cross_encoder_score(ce_shop):
    manifest = json.loads((ce_shop[0] / "artifacts" / "ranker-ce" / "manifest.json").read_text())
    assert CE_SCORE in manifest["features"] and PREV_SCORE in manifest["features"]


def test_split_must_match_the_rankers(demo_shop, tmp_path):
    shutil.copytree(demo_shop / "data", tmp_path / "data")
    _config(holdout_fraction=0.3).save(tmp_path / "pipeline.toml")
    with pytest.raises(ConfigError, match="holdout_fraction=0.3.*never trains on the ranker's holdout"):
        build_artifacts(load_config(tmp_path / "pipeline.toml"), progress=False, log=lambda m: None,
                        only=lambda s: s.name == "rerank.cross_encoder")


def test_rows_below_k_keep_their_order_under_the_top():
    qids = pa.chunked_array([pa.array([1, 1, 1, 1, 2, 2])])
    ranks = np.array([1, 2, 3, 4, 1, 2], np.int32)
    ce = np.array([0.5, 2.0, np.nan, np.nan, -1.0, np.nan], np.float32)
    s = _new_scores(qids, ranks, ce)
    assert s[1] > s[0] > s[2] > s[3] and s[4] > s[5]


@pytest.mark.parametrize("param, value", [("k", 0), ("precision", "int8"), ("layers", 0), ("negatives", -1),
                                          ("relevance_max", 0.5)])
def test_bad_params_are_named(param, value):
    with pytest.raises(ConfigError, match=f"'{param}' parameter of stage 'rerank.cross_encoder'"):
        CrossEncoderReranker(**{param: value}).validate_params()


@pytest.mark.slow
@pytest.mark.parametrize("check", [pytest.param(c, marks=[pytest.mark.gpu] if c == "cpu_gpu_parity" else [])
                                   for c in CHECKS])
def test_conforms(check, ce_pipeline, ce_shop):
    step = [s.name for s in ce_pipeline].index("rerank.cross_encoder")
    queries = pq.read_table(ce_shop[0] / "data" / "queries.parquet").slice(0, 6)
    stage = ce_pipeline.stages[step].clone(precision="fp32")
    # bf16/fp16 on the GPU against fp32 on the CPU: logits agree to ~1e-2
    CHECKS[check](StageCase(stage, ce_pipeline[:step](queries), parity_atol=5e-2))
