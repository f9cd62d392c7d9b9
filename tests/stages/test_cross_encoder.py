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

from stages.cross_encoder import CE_SCORE, PREV_SCORE, CrossEncoderReranker, _new_scores, cpu_has_bf16, save_untrained

K = 10
#: A 2-layer cross-encoder on ~800 pairs of the demo shop, one short epoch: these tests check the
#: plumbing (split, artifacts, second ranker); test_fine_tuning_learns_to_tell_matches_apart checks
#: that training moves the scores.
CE_PARAMS = {"model": "artifacts/cross_encoder", "k": K, "layers": 2, "epochs": 1.0, "learning_rate": 3e-4,
             "train_batch_size": 16, "negatives": 6, "max_train_queries": None, "valid_fraction": 0.3,
             "precision": "fp32"}


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


@pytest.mark.long
def test_training_never_reads_the_rankers_holdout(ce_shop):
    root, seen, _ = ce_shop
    held = set(pq.read_table(root / "artifacts" / "ranker" / "holdout_queries.parquet").column("query_id").to_pylist())
    assert seen and held and not held & set(seen)


@pytest.mark.long
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


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A 1-layer cross-encoder with an untrained head, saved as the stage loads one (seconds)."""
    return save_untrained(tmp_path_factory.mktemp("ce") / "v0", layers=1)


def test_fine_tuning_learns_to_tell_matches_apart():
    """A MiniLM bi-encoder's [CLS] state is the same for every input, so a [CLS] head cannot learn
    (the first version of this stage trained one and its scores never moved); the mean-pooled head
    separates matching from swapped titles within a few dozen steps."""
    import polars as pl
    from types import SimpleNamespace

    from stages.sentence_transformers import resolve_model

    queries = ["drill", "paint", "toilet seat", "shop vac", "patio umbrella", "vinyl flooring"]
    titles = ["cordless drill", "white paint", "elongated toilet seat", "wet dry vacuum", "market umbrella",
              "luxury vinyl plank"]
    swapped = titles[1:] + titles[:1]
    pairs = pl.DataFrame({"query_id": list(range(6)) * 2, "q": queries * 2, "t": titles + swapped,
                          "target": [1.0] * 6 + [0.0] * 6})
    import torch

    torch.manual_seed(0)
    stage = CrossEncoderReranker(layers=1, epochs=60.0, learning_rate=2e-4, train_batch_size=12)
    ce = stage._init_model(resolve_model(stage.base_model)[0])
    stage._fit(ce, pairs, SimpleNamespace(progress=False))
    from stages.cross_encoder import _score

    match, other = _score(ce, queries, titles, 16), _score(ce, queries, swapped, 16)
    assert (match > other).all(), (match, other)


def _candidates(n_queries=4, per_query=12):
    words = ["drill", "bit", "saw", "blade", "paint", "brush", "white", "cordless", "hammer", "nail", "wood", "screw"]
    rows = []
    for q in range(n_queries):
        query = f"{words[q]} {words[q + 1]}"
        for r in range(per_query):
            title = " ".join(words[(q + r + j) % len(words)] for j in range(1 + r % 5))
            rows.append({"query_id": q, "query": query, "item_id": f"i{q}-{r}", "title": title,
                         "score": float(per_query - r), "rank": r + 1})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("query_id", pa.int64()), ("query", pa.string()), ("item_id", pa.string()), ("title", pa.string()),
        ("score", pa.float32()), ("rank", pa.int32())]))


def test_top_k_reordered_the_rest_kept_below(untrained):
    stage = CrossEncoderReranker(model=str(untrained), k=5, precision="fp32", device="cpu")
    before = _candidates()
    out = stage(before)
    assert out.num_rows == before.num_rows
    for q in set(out.column("query_id").to_pylist()):
        rows = [r for r in out.to_pylist() if r["query_id"] == q]
        top, rest = rows[:5], rows[5:]
        assert all(r["recall_rank"] <= 5 for r in top) and all(not np.isnan(r[CE_SCORE]) for r in top)
        assert [r["recall_rank"] for r in rest] == sorted(r["recall_rank"] for r in rest)
        assert all(np.isnan(r[CE_SCORE]) for r in rest)
        assert [r[CE_SCORE] for r in top] == sorted((r[CE_SCORE] for r in top), reverse=True)
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        assert all(r[PREV_SCORE] == r["recall_score"] for r in rows)


def test_precision_auto_is_bf16_only_where_the_cpu_has_it(untrained):
    stage = CrossEncoderReranker(model=str(untrained), k=5, device="cpu")
    stage.warm_up()
    assert stage.precision_ == ("bf16" if cpu_has_bf16() else "fp32")
    fp32 = CrossEncoderReranker(model=str(untrained), k=5, precision="fp32", device="cpu")
    pairs = (["cordless drill"] * 3, ["cordless drill bit", "white paint", "hammer"])
    np.testing.assert_allclose(stage.score_pairs(*pairs), fp32.score_pairs(*pairs), atol=0.1)


@pytest.mark.long
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


@pytest.mark.parametrize("check", [pytest.param(c, marks=[pytest.mark.gpu] if c == "cpu_gpu_parity" else [])
                                   for c in CHECKS])
def test_conforms(check, untrained):
    stage = CrossEncoderReranker(model=str(untrained), k=5, precision="fp32")
    # fp32 on both devices; the tolerance leaves room for the GPU kernels
    CHECKS[check](StageCase(stage, _candidates(), parity_atol=5e-2))


def test_homedepot_rerank_config_composes_with_one_holdout_split():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "homedepot" / "rerank.toml")
    pipe = cfg.build()
    names = [s.name for s in pipe]
    assert names[-4:] == ["rank.lightgbm", "rerank.cross_encoder", "rank.lightgbm", "display.topn"]
    splits = {(s.holdout_fraction, s.seed) for s in pipe if s.name in ("rank.lightgbm", "rerank.cross_encoder")}
    assert splits == {(0.2, 0)}
    assert {CE_SCORE, PREV_SCORE} <= set(pipe.output_schema.names)


def test_homedepot_rerank_config_shares_pipeline_toml_up_to_the_first_ranker():
    """rerank.toml reuses pipeline.toml's artifacts (same paths): its stages up to the first ranker
    must be pipeline.toml's, or building one config would rebuild them under the other's settings."""
    import tomllib
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "examples" / "homedepot"
    main_stages = tomllib.loads((folder / "pipeline.toml").read_text())["stages"]
    rerank_stages = tomllib.loads((folder / "rerank.toml").read_text())["stages"]
    first = [s["type"] for s in main_stages].index("rank.lightgbm") + 1
    assert rerank_stages[:first] == main_stages[:first]
