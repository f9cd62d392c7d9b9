"""examples/beauty: the recommendation pipeline end to end, the feedback loop, and real data."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "beauty"
BEAUTY = REPO.parent / "shared" / "data" / "amazon_beauty"


def example_config(root: Path, data: dict[str, str]) -> Path:
    """The example config with its [data] pointed elsewhere, written into ``root``."""
    doc = tomllib.loads((EXAMPLE / "pipeline.toml").read_text())
    doc["data"] = data
    (root / "pipeline.toml").write_text(tomli_w.dumps(doc))
    return root / "pipeline.toml"


def generated_shop(root: Path, n_items=80, n_users=300, seed=0) -> None:
    """Items with titles and sessions that mostly follow fixed item -> successor transitions."""
    rng = np.random.default_rng(seed)
    kinds = ["lipstick", "mascara", "shampoo", "nail polish", "face cream", "perfume", "eyeliner", "conditioner"]
    ids = [f"B{i:04d}" for i in range(n_items)]
    titles = [f"{['red', 'blue', 'matte', 'gloss', 'argan'][i % 5]} {kinds[i % len(kinds)]} no {i}" for i in range(n_items)]
    successors = {i: rng.choice(n_items, 2, replace=False) for i in range(n_items)}
    seqs = []
    for _ in range(n_users):
        cur = int(rng.integers(n_items))
        seq = [cur]
        while len(seq) < rng.integers(4, 9):
            cur = int(rng.choice(successors[cur])) if rng.random() < 0.8 else int(rng.integers(n_items))
            if cur not in seq:
                seq.append(cur)
        seqs.append([ids[i] for i in seq])
    pq.write_table(pa.table({"item_id": ids, "title": titles}), root / "items.parquet")
    users = [f"U{u}" for u in range(n_users)]
    pq.write_table(pa.table({"user_id": users, "items": seqs}), root / "logs.parquet")
    pq.write_table(pa.table({"query_id": users, "history": seqs}), root / "users.parquet")
    more = [s + [ids[int(successors[ids.index(s[-1])][0])]] for s in seqs]
    pq.write_table(pa.table({"user_id": users, "items": more}), root / "logs_new.parquet")


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def load_evaluate():
    spec = importlib.util.spec_from_file_location("beauty_evaluate", EXAMPLE / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_recommend_then_feedback_loop_and_rollback(tmp_path):
    generated_shop(tmp_path)
    config = example_config(tmp_path, {"catalog": "items.parquet", "logs": "logs.parquet"})
    cli("build", config, "--quiet")
    cli("run", config, "-q", tmp_path / "users.parquet", "-o", tmp_path / "v1.parquet", "--quiet")
    recs = pl.read_parquet(tmp_path / "v1.parquet")
    assert {"query_id", "item_id", "rank", "score", "source", "score_assoc", "rank_content"} <= set(recs.columns)
    per_user = recs.group_by("query_id").agg(pl.col("item_id"), pl.col("rank"), pl.col("history").first())
    assert per_user.height == 300
    assert all(r == list(range(1, 11)) for r in per_user["rank"].to_list())           # every user gets 10
    assert not any(set(i) & set(h) for i, h in zip(per_user["item_id"], per_user["history"]))
    assert recs["source"].str.contains(r"\+").any()                                     # fused provenance

    v1 = {p: p.read_bytes() for p in (tmp_path / "artifacts" / "v1").rglob("manifest.json")}
    out = cli("build", config, "--logs", tmp_path / "logs_new.parquet", "--version", "v2", "--quiet")
    assert "v2" in out or (tmp_path / "artifacts" / "v2" / "ranker" / "manifest.json").exists()
    assert json.loads((tmp_path / "artifacts" / "v2" / "association" / "manifest.json").read_text())["logs"].endswith(
        "logs_new.parquet")
    assert {p: p.read_bytes() for p in (tmp_path / "artifacts" / "v1").rglob("manifest.json")} == v1   # v1 untouched
    cli("run", config, "-q", tmp_path / "users.parquet", "-o", tmp_path / "v2.parquet", "--version", "v2", "--quiet")
    cli("run", config, "-q", tmp_path / "users.parquet", "-o", tmp_path / "back.parquet", "--version", "v1", "--quiet")
    assert pl.read_parquet(tmp_path / "back.parquet").equals(recs)                      # rollback reproduces v1
    assert not pl.read_parquet(tmp_path / "v2.parquet").select("query_id", "item_id").equals(recs.select("query_id", "item_id"))


def test_version_errors(tmp_path):
    generated_shop(tmp_path, n_users=20)
    config = example_config(tmp_path, {"catalog": "items.parquet", "logs": "logs.parquet"})
    result = CliRunner().invoke(main, ["build", str(config), "--version", "../x"])
    assert result.exit_code == 2 and "is not a valid name" in result.output
    from pipeline.config import PipelineConfig, load_config

    cfg = load_config(config)
    assert cfg.build().stages[-2].model == "artifacts/v1/ranker"
    cfg.version = "v7"
    assert cfg.build().stages[-2].model == "artifacts/v7/ranker"
    text = PipelineConfig.normalised(load_config(config)).to_toml()
    assert 'model = "artifacts/{version}/ranker"' in text and 'version = "v1"' in text   # templates survive
    cfg.version = None
    with pytest.raises(ConfigError, match="no version"):
        cfg.build()
    plain = tmp_path / "plain.toml"
    plain.write_text(config.read_text().replace("{version}", "fixed"))
    result = CliRunner().invoke(main, ["run", str(plain), "-q", "u.parquet", "-o", "o.parquet", "--version", "v2"])
    assert result.exit_code == 2 and "{version}" in result.output


def test_split_and_metrics():
    evaluate = load_evaluate()
    targets = pl.DataFrame({"query_id": ["a", "b", "c"], "item_id": ["x", "y", "z"]})
    recs = pl.DataFrame({"query_id": ["a", "a", "b"], "item_id": ["q", "x", "y"], "rank": [1, 2, 1]})
    got = evaluate.hit_metrics(recs, targets)
    assert got["Recall@10"] == pytest.approx(2 / 3)
    assert got["NDCG@10"] == pytest.approx((1 / np.log2(3) + 1) / 3)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.long
def test_beauty_subset_leave_one_out(tmp_path):
    """The example, validated leave-one-out on a dense slice of the Beauty data: the 800 most bought items
    and the first 2000 users with 4+ purchases among them (few titles to embed, enough co-purchases)."""
    evaluate = load_evaluate()
    logs = pl.read_parquet(BEAUTY / "sequences_train.parquet")
    top = logs["items"].explode().value_counts().sort(["count", "items"], descending=[True, False]).head(800)["items"]
    logs = (logs.with_columns(pl.col("items").list.filter(pl.element().is_in(top.implode())))
            .filter(pl.col("items").list.len() >= 4).head(2000))
    pl.read_parquet(BEAUTY / "items.parquet").filter(pl.col("item_id").is_in(top.implode())).write_parquet(
        tmp_path / "items.parquet")
    logs.write_parquet(tmp_path / "logs.parquet")
    config = example_config(tmp_path, {"catalog": "items.parquet", "logs": "logs.parquet"})
    report = evaluate.evaluate(config, log=lambda m: None)
    assert report["run"]["users"] == 2000
    full = report["full pipeline"]
    assoc, content, popular = (report[f"source {s}"]["Recall@10"] for s in ("assoc", "content", "popular"))
    assert 0 < full["NDCG@10"] <= full["Recall@10"] <= 1
    assert full["Recall@10"] > content > popular
    assert full["Recall@10"] >= 0.95 * max(assoc, report["fused (RRF, no ranker)"]["Recall@10"])


def test_sequence_variant_is_the_example_plus_the_sequence_model():
    """pipeline.toml builds (schemas checked), is pipeline-no-sequence.toml plus the sequence source
    and features, and shares one model folder and one set of training parameters between them."""
    from pipeline.config import load_config

    base = load_config(EXAMPLE / "pipeline-no-sequence.toml").build()
    seq = load_config(EXAMPLE / "pipeline.toml").build()
    assert [s.name for s in seq.stages] == [s.name for s in base.stages][:3] + ["features.sequence"] + \
        [s.name for s in base.stages][3:]
    sources = {name: pipe.stages[0] for name, _, pipe in seq.stages[0]._pipelines()}
    assert set(sources) == {"assoc", "content", "popular", "brand", "sequence"}
    recall, feats = sources["sequence"], seq.stages[3]
    from stages.sequence import TRAIN_PARAMS

    assert recall.model == feats.model and recall.content == feats.content
    assert {p: getattr(recall, p) for p in TRAIN_PARAMS} == {p: getattr(feats, p) for p in TRAIN_PARAMS}
    assert {f.name for f in feats.produced_columns()} == {"f_seq_score", "f_seq_rank", "f_seq_logp"}
    assert {"f_score_sequence", "f_rank_sequence"} <= set(seq.stages[2].produced_columns().names)
