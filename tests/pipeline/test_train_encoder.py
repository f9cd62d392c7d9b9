"""`funnel train encoder`: fine-tuning the bundled MiniLM on generated judgments, for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
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
from pipeline.errors import MISSING_EXTRA
from pipeline.train_encoder import (BUILT_BY, MANIFEST_KIND, PICKLE_SUFFIXES, TRAIN_STEPS, next_version_dir,
                                    split_queries)


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



# -- issue 15: `funnel build` trains the encoder a config declares; prerequisites first ----------

TINY_TRAIN = {"epochs": 1, "batch_size": 16, "max_pairs": 32, "valid_fraction": 0.3, "val_items": 0,
              "evals_per_epoch": 1, "mine_depth": 0}


def _funnel(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `funnel` command as a user types it (the script next to this Python), in a subprocess."""
    script = Path(sys.executable).with_name("funnel")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    return subprocess.run([*cmd, *args], env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                          capture_output=True, text=True, timeout=900)


def _trainable_config(root: Path, train: dict, name: str = "build.toml") -> Path:
    path = root / name
    PipelineConfig(
        name="build-encoder-test", inputs={"query_id": "any", "query": "string"},
        data={"catalog": "data/catalog.parquet", "judgments": "data/judgments.parquet"},
        stages=[{"type": "encode.sentence_transformers", "params": {"model": "artifacts/encoder/v1", "train": train}},
                {"type": "recall.faiss", "params": {"index": "artifacts/index", "k": 20, "item_text": ["title", "brand"]}},
                {"type": "display.topn", "params": {"n": 10}}],
    ).save(path)
    return path


#: Run at start-up (``sitecustomize`` on PYTHONPATH): every import finder treats `datasets` (module
#: and distribution metadata) as not installed, as in an environment without the train extra (a
#: shadow package that raises would still be *found*, and libraries probing for it would import it).
_WITHOUT_DATASETS = """
import sys


class _Without:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] == "datasets" else self.inner.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):  # its metadata too: libraries probe that instead
        find = getattr(self.inner, "find_distributions", None)
        return [] if find is None else [d for d in find(*args, **kwargs) if (d.name or "").lower() != "datasets"]

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [_Without(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


@pytest.fixture
def without_datasets(tmp_path):
    """Environment for a `funnel` in which `datasets` is not installed (the train extra missing)."""
    folder = tmp_path / "no-train-extra"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_WITHOUT_DATASETS)
    return {"PYTHONPATH": str(folder)}


def test_train_encoder_without_the_train_extra_stops_before_any_work(tmp_path, without_datasets):
    config = _config(tmp_path)  # no data at all: the check comes before anything is read
    started = time.perf_counter()
    result = _funnel("train", "encoder", str(config), "--quiet", env=without_datasets)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("funnel: error: " + MISSING_EXTRA.format(
        needed_by="funnel train encoder", modules="datasets", verb="is", extra="train", command="pip install -e"))
    assert '[train]"' in lines[0]
    assert time.perf_counter() - started < 120  # seconds of start-up, not minutes of work
    assert not (tmp_path / "artifacts").exists()


def test_build_that_must_train_without_the_train_extra_stops_before_any_artifact(tmp_path, without_datasets):
    from pipeline.demo_data import generate_demo_data

    generate_demo_data(tmp_path / "data", n_items=40, n_queries=10, seed=3)
    config = _trainable_config(tmp_path, TINY_TRAIN)
    result = _funnel("build", str(config), "--quiet", env=without_datasets)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("funnel: error: funnel build (stage 'encode.sentence_transformers' must train "
                                    "its model 'artifacts/encoder/v1': missing) needs datasets, which is not installed "
                                    "(extra 'train')")
    assert not (tmp_path / "artifacts").exists() and result.stdout == ""


@pytest.mark.long  # fine-tunes the encoder (twice for the first)
def test_funnel_build_trains_the_encoder_when_missing_or_stale_and_keeps_it_otherwise(tmp_path):
    from pipeline.demo_data import generate_demo_data

    generate_demo_data(tmp_path / "data", n_items=120, n_queries=80, seed=4)
    config = _trainable_config(tmp_path, TINY_TRAIN)
    folder, index = tmp_path / "artifacts" / "encoder" / "v1", tmp_path / "artifacts" / "index"

    first = _funnel("build", str(config), "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    # what is built is said before it starts, and every step names the stage
    assert f"encode.sentence_transformers: training {folder} (missing) from 'all-MiniLM-L6-v2'" in out
    assert out.index("training") < out.index("step 1/5")
    for step in range(1, TRAIN_STEPS + 1):
        assert f"encode.sentence_transformers [train v1] step {step}/{TRAIN_STEPS}: " in out
    assert f"encode.sentence_transformers: trained {folder}" in out and "recall.faiss: indexed 120 items" in out
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["built_by"] == BUILT_BY and manifest["training"]["train_pairs"] == 32
    assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    index_key = json.loads((index / "manifest.json").read_text())["build_key"]

    again: list[str] = []  # (in this process: the CLI prints these same lines)
    build_artifacts(load_config(config), progress=False, log=again.append)
    assert again == [f"encode.sentence_transformers: up to date ({folder})", f"recall.faiss: up to date ({index})"]

    _trainable_config(tmp_path, {**TINY_TRAIN, "seed": 1})  # other settings: the model and its index are stale
    stale = _funnel("build", str(config), "--quiet")
    assert stale.returncode == 0, stale.stderr[-3000:]
    assert f"training {folder} (stale: its training data or settings changed)" in stale.stdout
    assert "recall.faiss: indexed 120 items" in stale.stdout
    renewed = json.loads((folder / "manifest.json").read_text())
    assert renewed["build_key"] != manifest["build_key"] and renewed["training"]["seed"] == 1
    assert json.loads((index / "manifest.json").read_text())["build_key"] != index_key
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary or old folder left


@pytest.mark.long  # fine-tunes the encoder (twice for the first)
def test_build_keeps_a_model_trained_by_hand(trained):
    from pipeline.build import BuildContext
    from pipeline.train_encoder import build_encoder

    root, _ = trained
    cfg = load_config(_trainable_config(root, TINY_TRAIN, name="hand.toml"))
    stage = cfg.build().stages[0]
    before = (root / "artifacts" / "encoder" / "v1" / "manifest.json").read_text()
    line = build_encoder(stage, BuildContext(cfg, progress=False, log=lambda m: None))
    assert "kept" in line and "did not write it" in line and "--force retrains it" in line
    assert (root / "artifacts" / "encoder" / "v1" / "manifest.json").read_text() == before


def test_the_encoder_build_key_follows_data_settings_and_split_only(tmp_path):
    from pipeline.demo_data import generate_demo_data
    from pipeline.train_encoder import encoder_build_key

    generate_demo_data(tmp_path / "data", n_items=40, n_queries=10, seed=3)

    def key(train: dict, **stage_params) -> str:
        cfg = load_config(_trainable_config(tmp_path, train))
        cfg.stages[0]["params"].update(stage_params)
        return encoder_build_key(cfg.build().stages[0], cfg)[0]

    base = key({"epochs": 1})
    assert key({"epochs": 1.0}) == base and key({}) == base  # defaults and 1 == 1.0
    assert key({"epochs": 1}, batch_size=8, precision="bf16") == base  # how the stage runs, not how it trains
    assert key({"epochs": 2}) != base and key({"seed": 1}) != base
    assert key({"base_model": "sentence-transformers/all-MiniLM-L6-v2"}) != base
    judgments = tmp_path / "data" / "judgments.parquet"
    pq.write_table(pq.read_table(judgments).slice(1), judgments)
    assert key({"epochs": 1}) != base
