"""`funnel train encoder`: fine-tuning the bundled MiniLM on generated judgments, for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import ArtifactError
from pipeline.artifacts import sha256_file
from pipeline.build import build_artifacts
from pipeline.cli import main
from pipeline.config import PipelineConfig, load_config
from pipeline.data import holdout_mask
from pipeline.train_encoder import MANIFEST_KIND, PICKLE_SUFFIXES, next_version_dir, split_queries


def _config(root: Path, model: str = "all-MiniLM-L6-v2", index: str = "artifacts/index") -> Path:
    path = root / f"{Path(model).name}.toml"
    PipelineConfig(
        name="finetune-test", inputs={"query_id": "any", "query": "string"},
        data={"catalog": "data/catalog.parquet", "judgments": "data/judgments.parquet"},
        stages=[{"type": "encode.sentence_transformers", "params": {"model": model}},
                {"type": "recall.faiss", "params": {"index": index, "k": 50, "item_text": ["title", "brand"]}},
                {"type": "display.topn", "params": {"n": 10}}],
    ).save(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A generated shop and one short fine-tuning run through the CLI (the slow part, done once)."""
    from pipeline.demo_data import generate_demo_data

    for module in ("datasets", "accelerate"):
        pytest.importorskip(module, reason="`funnel train encoder` needs the train extra (datasets, accelerate)")
    root = tmp_path_factory.mktemp("finetune")
    generate_demo_data(root / "data", n_items=300, n_queries=150, seed=3)
    config = _config(root)
    # 4 steps of 32 pairs; a large validation share (~38 queries) keeps its NDCG from being noise
    result = CliRunner().invoke(main, ["train", "encoder", str(config), "--epochs", "1", "--batch-size", "32",
                                       "--max-pairs", "128", "--valid-fraction", "0.3", "--val-items", "0",
                                       "--evals-per-epoch", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_split_is_the_rankers_holdout_and_disjoint():
    ids = pa.array(range(2000), type=pa.int64())
    train, valid, held = split_queries(ids, 0.2, 0, 0.1)
    assert held == [q for q, h in zip(ids.to_pylist(), holdout_mask(ids, 0.2, 0)) if h]
    assert not set(train) & set(valid) and not (set(train) | set(valid)) & set(held)
    assert sorted(train + valid + held) == list(range(2000))
    assert 0.15 < len(held) / 2000 < 0.25 and 0.05 < len(valid) / len(train + valid) < 0.15


def test_holdout_matches_the_ranker_files(demo_shop):
    from pipeline.data import read_judgments

    held_by_ranker = set(pq.read_table(demo_shop / "artifacts" / "ranker" / "holdout_queries.parquet")
                         .column("query_id").to_pylist())
    ids = read_judgments(demo_shop / "data" / "judgments.parquet").column("query_id").unique()
    train, valid, held = split_queries(ids, 0.2, 0, 0.1)
    assert set(held) == held_by_ranker
    assert not (set(train) | set(valid)) & held_by_ranker


def test_next_version_dir(tmp_path):
    assert next_version_dir(tmp_path / "none") == tmp_path / "none" / "v1"
    for name in ("v1", "v3", "vx", "v10b"):
        (tmp_path / name).mkdir()
    assert next_version_dir(tmp_path) == tmp_path / "v4"


def test_existing_output_folder_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    result = CliRunner().invoke(main, ["train", "encoder", str(_config(tmp_path)), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "already exists and is not empty" in result.output and (tmp_path / "out" / "x").exists()


@pytest.mark.slow
@pytest.mark.long  # needs the fine-tuning run of `trained`
def test_fine_tuning_writes_a_safetensors_model_with_a_manifest(trained):
    root, output = trained
    folder = root / "artifacts" / "encoder" / "v1"
    assert 'model = "artifacts/encoder/v1"' in output
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert (folder / "model.safetensors").exists()
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == MANIFEST_KIND and manifest["base_model"] == "all-MiniLM-L6-v2"
    assert manifest["data"]["judgments_sha256"] == sha256_file(root / "data" / "judgments.parquet")
    assert manifest["split"]["holdout_fraction"] == 0.2 and manifest["split"]["holdout_seed"] == 0
    assert manifest["training"]["train_pairs"] == 128 and manifest["training"]["negatives"]["judged"] > 0
    assert manifest["max_seq_length"] == 32
    assert set(manifest["files"]) == {str(p.relative_to(folder)) for p in files if p.name != "manifest.json"}
    for name, digest in manifest["files"].items():
        assert sha256_file(folder / name) == digest


@pytest.mark.slow
@pytest.mark.long  # needs the fine-tuning run of `trained`
def test_validation_ndcg_does_not_drop(trained):
    manifest = json.loads((trained[0] / "artifacts" / "encoder" / "v1" / "manifest.json").read_text())
    val = manifest["validation"]
    assert val["queries"] > 20 and val["items"] == 300 and len(val["history"]) == 2
    assert val["ndcg@10"] >= val["base_ndcg@10"]
    assert max(h["eval_val_ndcg@10"] for h in val["history"]) == val["ndcg@10"]


@pytest.mark.slow
@pytest.mark.long  # needs the fine-tuning run of `trained`
def test_a_pipeline_builds_and_runs_with_the_version_relative_to_the_config(trained, tmp_path, monkeypatch):
    root, _ = trained
    monkeypatch.chdir(tmp_path)  # the relative model path resolves against the config folder, not the CWD
    cfg = load_config(_config(root, model="artifacts/encoder/v1", index="artifacts/index-v1"))
    build_artifacts(cfg, progress=False, log=lambda m: None)
    pipe = cfg.build().warm_up()
    out = pipe(pa.table({"query_id": [1], "query": ["cordless drill"]}))
    assert out.num_rows == 10
    encoder = pipe.stages[0]
    assert encoder.model_.max_seq_length == 32
    tuned = encoder.encode_texts(["cordless drill", "led light bulb"])
    base = load_config(_config(root)).build().stages[0].encode_texts(["cordless drill", "led light bulb"])
    assert tuned.shape == base.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(tuned, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(tuned, base, atol=1e-4)


@pytest.mark.slow
@pytest.mark.long  # needs the fine-tuning run of `trained`
def test_a_changed_model_file_is_refused(trained, tmp_path):
    copy = tmp_path / "v1"
    shutil.copytree(trained[0] / "artifacts" / "encoder" / "v1", copy)
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text().replace("}", ' }', 1))
    from stages.sentence_transformers import SentenceTransformerEncoder

    with pytest.raises(ArtifactError, match="tokenizer_config.json is corrupted or was changed"):
        SentenceTransformerEncoder(model=str(copy)).warm_up()

