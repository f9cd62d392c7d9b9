"""The SASRec sequence model: learning a next-item pattern, artifacts, no peeking, both stages, conformance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.build import BuildContext
from pipeline.config import PipelineConfig
from pipeline.errors import ArtifactError, ConfigError
from pipeline.stage import Pipeline
from pipeline.testing import CHECKS, StageCase
from stages.sequence import SEQUENCE_FEATURES, SequenceFeatures, SequenceModel, SequenceRecall

N_ITEMS = 40
SMALL = dict(dim=32, layers=1, heads=2, max_len=10, dropout=0.1, epochs=40, batch_size=64, lr=0.01, negatives=0,
             patience=5, valid_users=40, num_threads=1, device="cpu")


def successor(i: int) -> int:
    return (i + 7) % N_ITEMS  # one cycle through all 40: no item repeats within a sequence


def pattern_logs(n_users=400, seed=0, unique_last=False) -> pa.Table:
    """Sequences that always go item i -> (i + 7) mod 40, from a random start; with ``unique_last`` each
    user's last item is one that appears nowhere else (a target nothing but that user's row holds)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for u in range(n_users):
        cur, seq = int(rng.integers(N_ITEMS)), []
        for _ in range(int(rng.integers(4, 8))):
            seq.append(f"i{cur:02d}")
            cur = successor(cur)
        seqs.append(seq + [f"only{u}"] if unique_last else seq)
    return pa.table({"user_id": [f"u{u}" for u in range(n_users)], "items": seqs})


def users(rows) -> pa.Table:
    return pa.table({"query_id": [r[0] for r in rows], "history": [r[1] for r in rows]},
                    schema=pa.schema([("query_id", pa.string()), ("history", pa.list_(pa.string()))]))


def ctx_for(root, logs: pa.Table) -> BuildContext:
    pq.write_table(logs, root / "logs.parquet")
    cfg = PipelineConfig(stages=[], data={"logs": "logs.parquet"}, base_dir=root)
    return BuildContext(cfg, progress=False, log=lambda m: None)


def built(stage, root, logs):
    stage._base_dir = root
    stage.build(None, ctx_for(root, logs))
    return stage


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence")
    logs = pattern_logs()
    recall = built(SequenceRecall(model="seq", content=None, k=5, **SMALL), root, logs)
    return root, logs, recall


def test_learns_a_next_item_pattern_far_above_chance(trained):
    root, _, recall = trained
    starts = range(0, N_ITEMS, 2)
    hist = [[f"i{s:02d}", f"i{successor(s):02d}"] for s in starts]
    out = recall(users([(f"q{i}", h) for i, h in enumerate(hist)])).to_pylist()
    top3 = {q: {r["item_id"] for r in out if r["query_id"] == q and r["rank"] <= 3} for q in {r["query_id"] for r in out}}
    hits = sum(f"i{successor(successor(s)):02d}" in top3[f"q{i}"] for i, s in enumerate(starts))
    assert hits / len(hist) >= 0.8                       # chance: 3 in 38
    manifest = json.loads((root / "seq" / "manifest.json").read_text())
    assert manifest["training"]["valid_recall@10"] >= 0.8


def test_features_score_and_rank_agree_with_recall(trained):
    root, logs, recall = trained
    feats = SequenceFeatures(model="seq", content=None, **SMALL)
    feats._base_dir = root
    feats.build(None, ctx_for(root, logs))               # same params and logs: the recall's model, not retrained
    assert "up to date" in feats.build(None, ctx_for(root, logs))
    batch = users([("a", ["i00", "i03"]), ("b", ["zz"])])
    cands = recall(batch)
    cands = pa.concat_tables([cands, users([("b", ["zz"])]).append_column("item_id", pa.array(["i05"]))
                              .append_column("score", pa.array([0.0], pa.float32()))
                              .append_column("rank", pa.array([1], pa.int32()))
                              .append_column("source", pa.array(["x"]))], promote_options="permissive")
    out = feats(cands).to_pylist()
    a = [r for r in out if r["query_id"] == "a"]
    assert [r["f_seq_rank"] for r in a] == [r["rank"] for r in a]                 # rank among all items
    assert [r["f_seq_score"] for r in a] == pytest.approx([r["score"] for r in a], rel=1e-4)
    assert all(r["f_seq_logp"] < 0 for r in a)
    b = [r for r in out if r["query_id"] == "b"][0]
    assert all(np.isnan(b[f"f_seq_{f}"]) for f in SEQUENCE_FEATURES)             # unknown history: missing


def test_save_load_round_trip_without_pickle(trained):
    root, _, recall = trained
    folder = root / "seq"
    assert sorted(p.name for p in folder.iterdir()) == ["items.parquet", "manifest.json", "model.safetensors"]
    again = SequenceModel.load(folder)
    hist = [np.array([1, 4, 7])]
    for a, b in zip(again.top_k(hist, 10), recall.model_.top_k(hist, 10)):
        assert np.allclose(a.numpy(), b.numpy())
    copy = root / "corrupt"
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        SequenceModel.load(copy)


def test_scoring_in_blocks_gives_the_one_block_results(trained, monkeypatch):
    """A catalogue too large for one block of SCORE_BLOCK scores is scored block by block: the same
    top k, scores, log-probabilities and ranks as one matrix product (here 5 users x 41 columns in
    blocks of 1, 2 and 7 columns)."""
    import stages.sequence as sequence

    root, logs, recall = trained
    feats = SequenceFeatures(model="seq", content=None, **SMALL)
    feats._base_dir = root
    batch = users([(f"u{i}", logs.column("items")[i].as_py()[:-1]) for i in range(4)] + [("cold", ["zz"])])
    cands = recall.clone(k=30)(batch)
    want_recall, want_feats = recall(batch), feats(cands)
    for block in (5, 10, 35):
        monkeypatch.setattr(sequence, "SCORE_BLOCK", block)
        got = recall(batch)
        assert got.select(["query_id", "item_id", "rank"]).equals(want_recall.select(["query_id", "item_id", "rank"]))
        assert np.allclose(got.column("score").to_numpy(), want_recall.column("score").to_numpy(), rtol=1e-5)
        got = feats(cands)
        for f in SEQUENCE_FEATURES:
            assert np.allclose(got.column(f"f_seq_{f}").to_numpy(zero_copy_only=False),
                               want_feats.column(f"f_seq_{f}").to_numpy(zero_copy_only=False), rtol=1e-5, equal_nan=True)


def test_training_samples_users_and_stops_before_it_would_not_fit(tmp_path, monkeypatch):
    from pipeline.build import MEMORY_ENV

    logs = pattern_logs(n_users=200, unique_last=True)                             # one item per user
    stage = built(SequenceRecall(model="seq", content=None, max_train_users=60, **{**SMALL, "epochs": 1}), tmp_path, logs)
    training = json.loads((tmp_path / "seq" / "manifest.json").read_text())["training"]
    assert training["train_users"] == 60                                           # a sample of the 200
    assert len(pq.read_table(tmp_path / "seq" / "items.parquet")) == N_ITEMS + 200  # every logged item known
    assert stage.clone(max_train_users=61).get_params()["max_train_users"] == 61
    monkeypatch.setenv(MEMORY_ENV, "1KB")
    with pytest.raises(ConfigError, match=r"stage 'recall.sequence': training on 60 users' histories .* "
                                          r"lower 'max_train_users' \(now 60\)"):
        SequenceRecall(model="seq2", content=None, max_train_users=60, **SMALL).build(None, ctx_for(tmp_path, logs))
    monkeypatch.delenv(MEMORY_ENV)
    monkeypatch.setattr("pipeline.build.available_memory", lambda: 1 << 20)      # the histories fit in 1 MB ...
    with pytest.raises(ConfigError, match=r"a softmax over all 240 items .* lower 'negatives' \(now 0\)"):
        SequenceRecall(model="seq2", content=None, max_train_users=60, **SMALL).build(None, ctx_for(tmp_path, logs))
    with pytest.raises(ConfigError, match="'max_train_users' parameter"):
        SequenceRecall(max_train_users=0).validate_params()


def test_large_catalogues_train_the_item_table_with_sparse_gradients(monkeypatch):
    """From SPARSE_ITEMS items on (sampled negatives) the item table learns with SparseAdam: the
    same next-item pattern is learnt (the 40-item pattern with the threshold lowered to 10)."""
    import stages.sequence as sequence

    monkeypatch.setattr(sequence, "SPARSE_ITEMS", 10)
    rows = {f"i{i:02d}": i + 1 for i in range(N_ITEMS)}
    seqs = [np.array([rows[i] for i in s]) for s in pattern_logs().column("items").to_pylist()]
    params = {k: v for k, v in SMALL.items() if k not in ("num_threads", "device")}
    model, info = sequence.train_sequence_model(seqs, N_ITEMS, None, **{**params, "negatives": 8}, progress=False)
    assert info["sparse_item_gradients"] and not model.item.sparse
    assert info["valid_recall@10"] >= 0.8
    _, dense = sequence.train_sequence_model(seqs, N_ITEMS, None, **{**params, "negatives": 0}, progress=False)
    assert not dense["sparse_item_gradients"]                                       # full softmax: dense


def test_content_vectors_make_unlogged_items_known(tmp_path):
    from indexes.faiss_index import FaissIndex

    logs = pattern_logs(n_users=120)
    ids = [f"i{i:02d}" for i in range(N_ITEMS)] + ["cold"]
    vectors = np.random.default_rng(0).normal(size=(len(ids), 16)).astype(np.float32)
    FaissIndex.build(vectors, pa.array(ids)).save(tmp_path / "content", extra={"build_key": "k1"})
    stage = built(SequenceRecall(model="seq", content="content", k=50, **{**SMALL, "epochs": 3}), tmp_path, logs)
    stage.warm_up()
    assert stage.model_.rows(["cold"])[0] > 0                                       # in the model's catalogue
    assert "cold" in stage(users([("a", ["i00", "i03"])])).column("item_id").to_pylist()
    (tmp_path / "content" / "manifest.json").write_text(
        (tmp_path / "content" / "manifest.json").read_text().replace('"k1"', '"k2"'))
    assert "trained" in stage.build(None, ctx_for(tmp_path, logs))                # new embeddings: retrained


def test_no_peeking_ranker_view_model_never_sees_the_targets(tmp_path):
    from stages.history import next_item_training

    logs = pattern_logs(n_users=150, unique_last=True)
    recall = SequenceRecall(model="seq", content=None, k=5, **{**SMALL, "epochs": 2})
    feats = SequenceFeatures(model="seq", content=None, **{**SMALL, "epochs": 2})
    for s in (recall, feats):
        s._base_dir = tmp_path
    ctx = ctx_for(tmp_path, logs)
    for s in (recall, feats):
        s.build(None, ctx)
    serving = pq.read_table(tmp_path / "seq" / "items.parquet").column("item_id").to_pylist()
    assert "only0" in serving                                                        # served model: all the logs
    queries, judgments, view = next_item_training(Pipeline([recall, feats]), ctx, tmp_path / "ranker" / "upstream")
    assert judgments.column("item_id").to_pylist()[0] == "only0"
    for stage in view.stages:
        manifest = json.loads((stage.resolve_path(stage.model) / "manifest.json").read_text())
        assert manifest["logs"].endswith("prior_logs.parquet")
        seen = pq.read_table(stage.resolve_path(stage.model) / "items.parquet").column("item_id").to_pylist()
        assert not any(i.startswith("only") for i in seen)                        # no target anywhere
    out = view(queries.slice(0, 20))
    assert out.num_rows and not any(i.startswith("only") for i in out.column("item_id").to_pylist())


def test_parameter_errors_name_the_parameter():
    with pytest.raises(ConfigError, match="'heads' parameter"):
        SequenceRecall(dim=30, heads=4).validate_params()
    with pytest.raises(ConfigError, match="'features' parameter"):
        SequenceFeatures(features=["nope"]).validate_params()
    with pytest.raises(ConfigError, match="'dropout' parameter"):
        SequenceRecall(dropout=1.0).validate_params()


@pytest.fixture(scope="module")
def cases(trained):
    root, logs, recall = trained
    feats = SequenceFeatures(model="seq", content=None, **SMALL)
    feats._base_dir = root
    batch = users([(f"u{i}", logs.column("items")[i].as_py()[:-1]) for i in range(10)] + [("cold", ["zz"])])
    cands = recall(batch)
    return [StageCase(recall, batch), StageCase(feats, cands)]


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
@pytest.mark.parametrize("which", [0, 1], ids=["recall", "features"])
def test_conformance(cases, which, check):
    CHECKS[check](cases[which])


@pytest.mark.gpu
@pytest.mark.parametrize("which", [0, 1], ids=["recall", "features"])
def test_cpu_gpu_parity(cases, which):
    CHECKS["cpu_gpu_parity"](cases[which])


@pytest.mark.gpu
def test_cuda_training_matches_cpu_quality(tmp_path):
    logs = pattern_logs()
    built(SequenceRecall(model="cpu", content=None, **SMALL), tmp_path, logs)
    gpu = built(SequenceRecall(model="gpu", content=None, **{**SMALL, "device": "cuda"}), tmp_path, logs)
    r_cpu = json.loads((tmp_path / "cpu" / "manifest.json").read_text())["training"]["valid_recall@10"]
    r_gpu = json.loads((tmp_path / "gpu" / "manifest.json").read_text())["training"]["valid_recall@10"]
    assert abs(r_cpu - r_gpu) <= 0.1 and r_gpu >= 0.8
    assert gpu.device == "cuda"


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.long
def test_beauty_sequence_model_alone(tmp_path):
    """On Amazon Beauty (leave-one-out, logs without each user's last item, no title embeddings so that
    nothing needs encoding, 3 epochs): the model alone ranks the held-out item in the top 10 for 2%+
    of users, 25 times chance (measured 2026-12-01: 0.0254 in 400 s on the loaded 2-core machine; with
    the title embeddings and 2 epochs 0.0515; published SASRec on the maintainers' later target: 0.0605)."""
    from pipeline.data import next_item_targets

    logs = pq.read_table(Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon_beauty" /
                         "sequences_train.parquet")
    queries, judgments, prior = next_item_targets(logs)
    stage = built(SequenceRecall(model="seq", k=10, epochs=3, num_threads=2, device="cpu"), tmp_path, prior)
    recs = pa.concat_tables([stage(queries.slice(i, 2048)) for i in range(0, queries.num_rows, 2048)])
    got = set(zip(recs.column("query_id").to_pylist(), recs.column("item_id").to_pylist()))
    hits = sum((q, i) in got for q, i in zip(judgments.column("query_id").to_pylist(),
                                             judgments.column("item_id").to_pylist()))
    assert hits / queries.num_rows >= 0.02


def test_histories_longer_than_any_training_input_are_cut_to_the_model():
    from stages.sequence import train_sequence_model

    seqs = [np.array([1, 2, 3])] * 30 + [np.arange(1, 13)]          # seed 6 holds the long one out for validation
    model, info = train_sequence_model(seqs, 12, None, dim=8, layers=1, heads=1, max_len=20, epochs=1, negatives=0,
                                       valid_users=31, seed=6, progress=False)
    assert model.pos.num_embeddings <= 11 and info["epochs_run"] == 1
