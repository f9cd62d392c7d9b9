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


# -- sharded, resumable build of a catalog (issue 20) -----------------------------------------

WORDS = ("cordless drill garden hose led bulb paint roller white steel oak brass outdoor indoor ceiling fan "
         "wall tile copper pipe vinyl plank door knob").split()


def _catalog(root, n=300, seed=0, **params):
    import numpy as np

    rng = np.random.default_rng(seed)
    titles = [" ".join(rng.choice(WORDS, 3)) + f" {i}" for i in range(n)]
    pq.write_table(pa.table({"product_id": list(range(1000, 1000 + n)), "title": titles}), root / "catalog.parquet",
                   row_group_size=70)  # row groups that do not line up with the chunks
    cfg = PipelineConfig(
        stages=[{"type": "encode.sentence_transformers", "params": {}},
                {"type": "recall.faiss", "params": {"index": "artifacts/index", "k": 5, "item_text": ["title"],
                                                    "build_chunk_rows": 80, **params}}],
        data={"catalog": "catalog.parquet"})
    cfg.save(root / "p.toml")
    return root / "p.toml"


def _index(root):
    from indexes import FaissIndex

    index = FaissIndex.load(root / "artifacts" / "index")
    return index.ids.to_pylist(), index.vectors(range(index.ntotal))


def _counting(monkeypatch, fail_on=None):
    """Count the encoder's encode_texts calls; raise on call number ``fail_on``."""
    from stages.sentence_transformers import SentenceTransformerEncoder

    calls, original = [], SentenceTransformerEncoder.encode_texts

    def encode_texts(self, texts, **kw):
        calls.append(len(texts))
        if len(calls) == fail_on:
            raise KeyboardInterrupt("stopped")
        return original(self, texts, **kw)

    monkeypatch.setattr(SentenceTransformerEncoder, "encode_texts", encode_texts)
    return calls


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A catalog of 300 items built in shards of 80 rows, without interruption."""
    root = tmp_path_factory.mktemp("sharded")
    config = _catalog(root)
    logs = []
    build_artifacts(load_config(config), progress=False, log=logs.append)
    return root, logs


def test_sharded_build_equals_the_one_shot_build(sharded, tmp_path):
    import json

    import numpy as np

    root, logs = sharded
    assert "indexed 300 items (Flat, dim 384; encoded 300 items in " in logs[-1]
    assert not list((root / "artifacts").glob("index.parts-*"))           # the work folder is removed
    manifest = json.loads((root / "artifacts" / "index" / "manifest.json").read_text())
    assert manifest["factory"] == "Flat" and "nprobe" not in manifest
    ids, vectors = _index(root)

    config = _catalog(tmp_path)                                          # the same catalog in one chunk
    text = config.read_text().replace("build_chunk_rows = 80", "build_chunk_rows = 1000000")
    config.write_text(text)
    build_artifacts(load_config(config), progress=False, log=lambda m: None)
    one_ids, one_vectors = _index(tmp_path)
    assert ids == one_ids == list(range(1000, 1300))
    # the encoder batches the texts differently, so the vectors agree up to rounding
    np.testing.assert_allclose(vectors, one_vectors, atol=1e-6)
    queries = pa.table({"query_id": [1, 2, 3], "query": ["oak door knob", "garden hose 17", "copper pipe"]})
    got = load_config(root / "p.toml").build()(queries)
    expected = load_config(config).build()(queries)
    assert got.column("item_id").to_pylist() == expected.column("item_id").to_pylist()


def test_a_stopped_build_resumes_without_encoding_the_finished_shards(sharded, tmp_path, monkeypatch):
    import numpy as np

    config = _catalog(tmp_path)
    calls = _counting(monkeypatch, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        build_artifacts(load_config(config), progress=False, log=lambda m: None)
    (work,) = (tmp_path / "artifacts").glob("index.parts-*")
    assert sorted(p.name for p in work.iterdir()) == ["part-00000.arrow", "part-00001.arrow"]
    assert not (tmp_path / "artifacts" / "index" / "manifest.json").exists()

    calls.clear()
    logs = []
    build_artifacts(load_config(config), progress=False, log=logs.append)
    assert calls == [80, 60]                                             # shards 2 and 3 only
    assert "resuming: 2 of 4 shards already encoded" in logs[0]
    assert not work.exists()
    ids, vectors = _index(tmp_path)
    ref_ids, ref_vectors = _index(sharded[0])
    assert ids == ref_ids
    np.testing.assert_array_equal(vectors, ref_vectors)                 # the uninterrupted build's index


def test_an_index_that_will_not_fit_stops_before_encoding(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.build import MEMORY_ENV
    from pipeline.cli import main

    config = _catalog(tmp_path)
    calls = _counting(monkeypatch)
    monkeypatch.setenv(MEMORY_ENV, "1MB")
    result = CliRunner().invoke(main, ["build", str(config), "--quiet"])
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("funnel: error:")]
    assert "stage 'recall.faiss': indexing 300 items x 384 dimensions (Flat, shards of 80 rows)" in line
    assert "would hold about 730.0 KB in memory" in line                # 300 x 384 x 4 B + two shards + text
    assert "lower 'factory' (now 'Flat')" in line and f"is left under {MEMORY_ENV}=1MB" in line
    assert calls == [] and not list((tmp_path / "artifacts").glob("index*"))

    config.write_text(config.read_text().replace("build_chunk_rows = 80", "build_chunk_rows = 100000"))
    result = CliRunner().invoke(main, ["build", str(config), "--quiet"])
    assert "lower 'build_chunk_rows' (now 100000)" in result.output, result.output


def test_build_chunk_rows_is_checked_and_leaves_downstream_keys_alone():
    from pipeline.build import key_params
    from pipeline.errors import ConfigError
    from stages.faiss import FaissRecall

    with pytest.raises(ConfigError, match="build_chunk_rows"):
        FaissRecall(build_chunk_rows=0).validate_params()
    assert "build_chunk_rows" not in key_params(FaissRecall(build_chunk_rows=10))


def test_a_trained_factory_is_trained_from_the_shard_files(sharded, tmp_path):
    import json

    import numpy as np

    from indexes import FaissIndex

    config = _catalog(tmp_path, factory="IVF4,Flat")
    build_artifacts(load_config(config), progress=False, log=lambda m: None)
    index = FaissIndex.load(tmp_path / "artifacts" / "index")
    assert json.loads((tmp_path / "artifacts" / "index" / "manifest.json").read_text())["factory"] == "IVF4,Flat"
    ids, vectors = _index(sharded[0])                                    # the same texts in the same chunks
    one = FaissIndex.build(vectors, pa.array(ids, pa.int64()), factory="IVF4,Flat")
    (scores, positions), (one_scores, one_positions) = (x.search(vectors[:20], 5, nprobe=2) for x in (index, one))
    np.testing.assert_array_equal(positions, one_positions)
    np.testing.assert_allclose(scores, one_scores, atol=1e-6)          # read back after a second normalisation
