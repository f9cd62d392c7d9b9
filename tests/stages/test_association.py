"""Item-to-item association index and recall, and popularity recall, on small generated logs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.build import BuildContext
from pipeline.config import PipelineConfig
from pipeline.errors import ArtifactError, ConfigError, DataError
from pipeline.testing import CHECKS, StageCase
from stages.association import AssociationIndex, AssociationRecall, top_k_rows
from stages.popularity import PopularityRecall, learn_popularity


def markov_logs(n_items=40, n_users=200, seed=0):
    """Sequences that mostly follow item i -> one of three fixed successors of i (no repeats)."""
    rng = np.random.default_rng(seed)
    successors = {i: rng.choice(n_items, 3, replace=False) for i in range(n_items)}
    seqs = []
    for _ in range(n_users):
        cur = int(rng.integers(n_items))
        seq = [cur]
        for _ in range(int(rng.integers(3, 8))):
            cur = int(rng.choice(successors[cur])) if rng.random() < 0.85 else int(rng.integers(n_items))
            if cur not in seq:
                seq.append(cur)
        seqs.append([f"i{x:02d}" for x in seq])
    return pa.table({"user_id": [f"u{u}" for u in range(n_users)], "items": seqs}), successors


def ctx_for(tmp_path, logs: pa.Table) -> BuildContext:
    pq.write_table(logs, tmp_path / "logs.parquet")
    cfg = PipelineConfig(stages=[], data={"logs": "logs.parquet"}, base_dir=tmp_path)
    return BuildContext(cfg, progress=False, log=lambda m: None)


def built(stage, tmp_path, logs):
    stage._base_dir = tmp_path
    stage.build(None, ctx_for(tmp_path, logs))
    return stage


def users(rows):
    return pa.table({"query_id": [r[0] for r in rows], "history": [r[1] for r in rows]},
                    schema=pa.schema([("query_id", pa.string()), ("history", pa.list_(pa.string()))]))


# -- the index --------------------------------------------------------------------------------


def test_weights_follow_distance_direction_and_popularity():
    seqs = pa.array([["a", "b", "c"], ["a", "b"]])
    index = AssociationIndex.learn(seqs, window=5, forward=1.0, backward=0.5, decay=0.5, alpha=0.0, beta=0.0)
    a, b, c = index.positions(["a", "b", "c"])
    m = index.matrix.toarray()
    assert m[a, b] == pytest.approx(2.0)          # a -> b twice, adjacent
    assert m[b, a] == pytest.approx(1.0)          # against time order: backward 0.5, twice
    assert m[a, c] == pytest.approx(0.5)          # two steps apart: decay once
    assert m[c, a] == pytest.approx(0.25)
    assert m[a, a] == 0
    pop = AssociationIndex.learn(seqs, window=5, forward=1.0, backward=0.5, decay=0.5, alpha=0.0, beta=1.0)
    assert pop.matrix.toarray()[a, b] == pytest.approx(2.0 / 2)   # b appears twice
    assert list(index.counts[[a, b, c]]) == [2, 2, 1]


def test_log_recency_and_top_m():
    seqs = pa.array([["a", "b", "x", "y", "z"]])
    flat = AssociationIndex.learn(seqs, backward=0.0, decay=1.0, beta=0.0)
    recent = AssociationIndex.learn(seqs, backward=0.0, decay=1.0, beta=0.0, log_recency=0.5)
    a, b, z = recent.positions(["a", "b", "z"])
    assert flat.matrix[a, b] == pytest.approx(1.0)
    assert recent.matrix[a, b] == pytest.approx(0.5 ** 3)   # b is 3 steps before the end
    small = AssociationIndex.learn(seqs, backward=0.0, decay=0.5, beta=0.0, top_m=2)
    assert small.matrix.getnnz(axis=1).max() == 2
    assert set(small.matrix[a].indices) == set(small.positions(["b", "x"]))


def test_save_load_round_trip_and_corruption(tmp_path):
    logs, _ = markov_logs()
    index = AssociationIndex.learn(logs.column("items"), top_m=10)
    index.save(tmp_path / "assoc")
    manifest = json.loads((tmp_path / "assoc" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"items.parquet", "neighbours.parquet"} and manifest["kind"] == "association"
    back = AssociationIndex.load(tmp_path / "assoc")
    assert back.ids.to_pylist() == index.ids.to_pylist()
    assert abs(back.matrix - index.matrix).max() < 1e-6
    rows, cols = index.matrix.nonzero()
    assert np.allclose(back.pair_scores(rows, cols), np.asarray(index.matrix[rows, cols]).ravel())
    assert back.pair_scores(np.array([-1, 0]), np.array([0, -1])).tolist() == [0.0, 0.0]
    with open(tmp_path / "assoc" / "neighbours.parquet", "ab") as f:
        f.write(b"junk")
    with pytest.raises(ArtifactError, match="corrupted or was changed"):
        AssociationIndex.load(tmp_path / "assoc")
    with pytest.raises(ArtifactError, match="run `funnel build"):
        AssociationIndex.load(tmp_path / "nothing")


def test_null_items_in_logs_fail_clearly():
    with pytest.raises(DataError, match="1 null item id"):
        AssociationIndex.learn(pa.array([["a", None, "b"]]))


# -- recall -----------------------------------------------------------------------------------


def test_recall_finds_successors_and_excludes_history(tmp_path):
    logs, _ = markov_logs()
    stage = built(AssociationRecall(index="assoc", k=5), tmp_path, logs)
    out = stage(users([("u1", ["i03", "i07"]), ("u2", ["i10"]), ("cold", ["nope"]), ("empty", [])]))
    rows = out.to_pylist()
    assert {r["query_id"] for r in rows} == {"u1", "u2"}                  # unknown / empty history: no rows
    u1 = [r for r in rows if r["query_id"] == "u1"]
    assert [r["rank"] for r in u1] == [1, 2, 3, 4, 5]
    assert all(r["item_id"] not in ("i03", "i07") for r in u1)
    assert [r["score"] for r in u1] == sorted((r["score"] for r in u1), reverse=True)
    follows = Counter(b for seq in logs.column("items").to_pylist() for a, b in zip(seq, seq[1:]) if a == "i07")
    assert u1[0]["item_id"] == next(i for i, _ in follows.most_common() if i != "i03")   # the last item weighs most
    assert {r["source"] for r in rows} == {"assoc"}
    keep = stage.clone(exclude_history=False, k=40)
    keep._base_dir = tmp_path
    assert "i03" in keep(users([("u1", ["i03", "i07"])])).column("item_id").to_pylist()


def test_build_is_cached_by_logs_and_settings(tmp_path):
    logs, _ = markov_logs()
    stage = AssociationRecall(index="assoc")
    stage._base_dir = tmp_path
    ctx = ctx_for(tmp_path, logs)
    assert "associations" in stage.build(None, ctx)
    assert "up to date" in stage.build(None, ctx)
    assert "associations" in stage.clone(beta=0.5).build(None, ctx)
    logs2, _ = markov_logs(seed=1)
    assert "associations" in stage.build(None, ctx_for(tmp_path, logs2))


def test_bad_logs_and_params(tmp_path):
    pq.write_table(pa.table({"user_id": ["u"], "items": ["a b"]}), tmp_path / "logs.parquet")
    cfg = PipelineConfig(stages=[], data={"logs": "logs.parquet"}, base_dir=tmp_path)
    stage = AssociationRecall(index="assoc")
    stage._base_dir = tmp_path
    with pytest.raises(DataError, match="column 'items' must be a list"):
        stage.build(None, BuildContext(cfg, progress=False, log=lambda m: None))
    with pytest.raises(ConfigError, match="'recency' parameter of stage 'recall.association' must be a number in"):
        AssociationRecall(recency=0).validate_params()
    with pytest.raises(ConfigError, match="'k' parameter"):
        AssociationRecall(k=0).validate_params()


def test_popularity_counts_recent_and_backfills(tmp_path):
    table = learn_popularity(pa.array([["a", "b", "c"], ["b", "c"], ["c"]]), recent_decay=0.5)
    got = {r["item_id"]: (r["count"], r["recent"]) for r in table.to_pylist()}
    assert got == {"a": (1, 0.25), "b": (2, 0.5 + 0.5), "c": (3, 3.0)}
    logs, _ = markov_logs()
    stage = built(PopularityRecall(index="pop", k=8), tmp_path, logs)
    hist = [f"i{x:02d}" for x in range(30)]
    out = stage(users([("u1", hist), ("u2", []), ("u3", ["x"])]))
    per_user = {q: [r for r in out.to_pylist() if r["query_id"] == q] for q in ("u1", "u2", "u3")}
    assert all(len(v) == 8 for v in per_user.values())                # every user gets k items
    assert not set(hist) & {r["item_id"] for r in per_user["u1"]}
    assert [r["rank"] for r in per_user["u2"]] == list(range(1, 9))
    recent = built(PopularityRecall(index="pop", k=3, by="recent"), tmp_path, logs)
    assert recent(users([("u", [])])).column("score").to_pylist() == sorted(
        table_scores := learn_popularity(logs.column("items"), 0.8).column("recent").to_pylist(), reverse=True)[:3]
    assert table_scores


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("assoc_cases")
    logs, _ = markov_logs()
    batch = users([(f"u{i}", logs.column("items")[i].as_py()[:-1]) for i in range(12)] + [("cold", ["zz"])])
    return [StageCase(built(AssociationRecall(index="assoc", k=6), tmp, logs), batch),
            StageCase(built(PopularityRecall(index="pop", k=4), tmp, logs), batch)]


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
@pytest.mark.parametrize("which", [0, 1], ids=["association", "popularity"])
def test_conformance(cases, which, check):
    CHECKS[check](cases[which])


def test_pairs_counted_in_chunks_of_users_give_the_same_index(monkeypatch):
    import stages.association as association

    logs, _ = markov_logs(n_users=300)
    whole = AssociationIndex.learn(logs.column("items"), window=4)
    monkeypatch.setattr(association, "PAIRS_PER_CHUNK", 50)       # dozens of chunks
    chunked = AssociationIndex.learn(logs.column("items"), window=4)
    assert whole.ids.equals(chunked.ids) and np.array_equal(whole.counts, chunked.counts)
    assert abs(whole.matrix - chunked.matrix).max() < 1e-6 and whole.matrix.nnz == chunked.matrix.nnz


def test_association_memory_estimate_counts_window_pairs():
    from stages.association import association_memory, window_pairs

    lengths = np.array([1, 2, 5, 30])
    assert window_pairs(lengths, 3).tolist() == [0, 1, 9, 29 + 28 + 27]
    assert window_pairs(lengths, 3)[2] == 4 + 3 + 2                  # 5 items: pairs 1, 2 and 3 steps apart
    assert association_memory(lengths, n_items=3, window=3) < association_memory(lengths, n_items=1000, window=3)


# -- the vectorised lookups against plain references --------------------------------------------


def _reference_top_k(dense: np.ndarray, k: int, exclude: list[np.ndarray]):
    """Per row, the k best positive entries not excluded: best first, ties to the lower column."""
    out = []
    for r, row in enumerate(dense):
        cols = [c for c in np.flatnonzero(row > 0) if c not in set(exclude[r].tolist())]
        out += [(r, c, np.float32(row[c])) for c in sorted(cols, key=lambda c: (-row[c], c))[:k]]
    return out


def test_pair_scores_and_top_k_match_dense_references():
    logs, _ = markov_logs(n_items=60, n_users=400, seed=3)
    index = AssociationIndex.learn(logs.column("items"), window=4, top_m=12)
    dense = index.matrix.toarray()
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(-1, len(index), 5000), rng.integers(-1, len(index), 5000)
    expected = np.where((rows >= 0) & (cols >= 0), dense[rows, cols], 0).astype(np.float32)
    np.testing.assert_array_equal(index.pair_scores(rows, cols), expected)
    # histories: empty, unknown items (-1), an item twice, long ones; k below and above the row lengths
    histories = [np.array([], np.int64), np.array([-1]), np.array([3, 3, 7]), np.array([5, -1, 9])]
    histories += [rng.integers(-1, len(index), int(rng.integers(1, 30))) for _ in range(60)]
    scores = index.user_scores(histories, 0.6)
    for k in (1, 5, 40, 500):
        for exclude in (histories, None):
            got = [(int(r), int(c), v) for r, c, v in zip(*top_k_rows(scores, k, exclude))]
            nothing = [np.zeros(0, np.int64)] * len(histories)
            assert got == _reference_top_k(scores.toarray(), k, nothing if exclude is None else exclude)


def test_sorted_ids_find_what_the_hash_lookup_finds():
    """Binary search over sorted integer ids gives lookup_positions' rows, -1 where absent; ids that
    are not integers, or hold nulls, are left to the general path (None)."""
    from stages.association import SortedIds, lookup_positions

    ids = pa.array([40, 7, 19, 3, 1000], pa.int64())
    values = pa.chunked_array([pa.array([3, 5, 1000], pa.int32()), pa.array([40, 7, -1, 19, 2000], pa.int32())])
    got = SortedIds.of(ids).positions(values)
    np.testing.assert_array_equal(got, lookup_positions(values, ids))
    assert got.tolist() == [3, -1, 4, 0, 1, -1, 2, -1]
    assert SortedIds.of(pa.array([], pa.int64())).positions(values).tolist() == [-1] * 8
    assert SortedIds.of(pa.array(["a", "b"])) is None and SortedIds.of(pa.array([1, None])) is None
    assert SortedIds.of(ids).positions(pa.array(["3"])) is None and SortedIds.of(ids).positions(pa.array([3, None])) is None
