from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pipeline import ConfigError
from stages.features import FEATURES, TextMatchFeatures


def test_text_match_features_values():
    t = pa.table({"query_id": [1, 2], "query": ["Ironvale 3/4 in. drill", "led bulb"],
                  "title": ["Ironvale 3/4 in. Cordless Drill", None], "brand": ["Ironvale", None],
                  "score": pa.array([0.5, 0.1], pa.float32()), "rank": pa.array([1, 1], pa.int32())})
    row = TextMatchFeatures()(t).to_pylist()
    assert row[0]["f_overlap"] == 4 and row[0]["f_coverage"] == 1.0 and row[0]["f_number_match"] == 1.0
    assert row[0]["f_brand_match"] == 1.0 and row[1]["f_brand_match"] == 0.0
    assert row[1]["f_title_len"] == 0 and row[1]["f_coverage"] == 0.0
    assert t.column_names == ["query_id", "query", "title", "brand", "score", "rank"]


def test_unknown_feature_lists_known_ones():
    with pytest.raises(ConfigError, match="drawn from " + ", ".join(FEATURES)):
        TextMatchFeatures(features=["nope"]).validate_params()


def test_required_columns_follow_selected_features():
    stage = TextMatchFeatures(features=["title_len"], title_column="name")
    assert stage.required_columns().names == ["query_id", "name"]


def test_popularity_is_log1p_of_the_column_and_zero_where_missing():
    t = pa.table({"query_id": [1, 1, 1], "sales": [0.0, 9.0, None]})
    stage = TextMatchFeatures(features=["popularity"], popularity_column="sales")
    assert stage.required_columns().names == ["query_id", "sales"]
    assert stage(t).column("f_popularity").to_pylist() == pytest.approx([0.0, math.log(10.0), 0.0])


def _reference_row(query, title, brand, colors):
    """The text features of one row, written out plainly (sets, one row at a time)."""
    import re

    import Stemmer

    stem = Stemmer.Stemmer("english")
    tok = (lambda text: re.findall(r"[a-z0-9]+(?:[./][0-9]+)*", (text or "").lower()))
    num = (lambda text: re.findall(r"[0-9]+(?:[./][0-9]+)*", (text or "").lower()))
    q, t, qn, tn = tok(query), tok(title), num(query), num(title)
    qs, ts = set(stem.stemWords(q)), set(stem.stemWords(t))
    ov, sov = len(set(q) & set(t)), len(qs & ts)
    div = (lambda a, b: a / b if b > 0 else 0.0)
    said = (lambda v: bool(v) and v.lower() in query.lower())
    return {"f_overlap": ov, "f_coverage": div(ov, len(q)), "f_jaccard": div(ov, len(set(q)) + len(set(t)) - ov),
            "f_stem_overlap": sov, "f_stem_coverage": div(sov, len(qs)), "f_title_len": len(t), "f_query_len": len(q),
            "f_number_match": div(len(set(qn) & set(tn)), len(qn)), "f_query_has_number": float(bool(qn)),
            "f_brand_match": float(said(brand)), "f_color_match": float(any(said(c) for c in colors or []))}


def test_features_worked_out_per_distinct_text_equal_a_row_by_row_reference():
    """Tokens, stems, distinct counts and attribute mentions are computed once per distinct query,
    title or (query, attribute) pair; every value equals the plain per-row computation."""
    import numpy as np

    rng = np.random.default_rng(3)
    words = ["drill", "drills", "drilling", "cordless", "3/4", "in.", "60", "watt", "led", "bulbs", "red", "white",
             "Ironvale", "hose", "garden", "1.5", "x"]
    n = 400
    text = (lambda lo, hi: " ".join(rng.choice(words, size=int(rng.integers(lo, hi)))))
    queries = [text(1, 5) for _ in range(25)]
    rows = {"query_id": [], "query": [], "title": [], "brand": [], "colors": []}
    for _ in range(n):
        qi = int(rng.integers(len(queries)))
        rows["query_id"].append(qi)
        rows["query"].append(queries[qi])
        rows["title"].append(None if rng.random() < 0.05 else text(0, 8) if rng.random() < 0.5 else f"title {rng.integers(30)} drill")
        rows["brand"].append([None, "", "Ironvale", "Acme", "RED"][int(rng.integers(5))])
        rows["colors"].append([None, [], ["white"], ["Red", None], ["blue", "white"]][int(rng.integers(5))])
    table = pa.table(rows)
    names = ["overlap", "coverage", "jaccard", "stem_overlap", "stem_coverage", "title_len", "query_len",
             "number_match", "query_has_number", "brand_match", "color_match"]
    out = TextMatchFeatures(features=names, color_column="colors")(table).to_pylist()
    for row, got in zip(table.to_pylist(), out):
        want = _reference_row(row["query"], row["title"], row["brand"], row["colors"])
        assert {k: got[k] for k in want} == {k: float(np.float32(v)) for k, v in want.items()}, row


def test_titles_cached_between_batches_give_the_values_of_a_fresh_stage(monkeypatch):
    """A title's tokens, numbers and stems are kept from batch to batch; every batch's features
    equal those of a stage that never saw another batch, also after the cache starts over."""
    import pyarrow.compute as pc

    import stages.features as features

    titles = [f"Ironvale {n} in. cordless drill bits" if n % 3 else None for n in range(40)]
    batches = [pa.table({"query_id": [b] * 20, "query": [f"{b} in. drill"] * 20,
                         "title": titles[b * 5:b * 5 + 20], "brand": ["Ironvale"] * 20}) for b in range(5)]
    batches.append(batches[0].slice(0, 0))  # an empty batch in the middle of a run
    batches.append(batches[4])  # every title cached
    names = ["overlap", "stem_coverage", "title_len", "number_match", "brand_match"]
    monkeypatch.setattr(features, "TITLE_CACHE_MAX", 20)  # starts over during the run
    stage = TextMatchFeatures(features=names)
    seen, sizes, want = set(), [], []
    for batch in batches:
        got = stage(batch)
        assert got.equals(TextMatchFeatures(features=names)(batch))
        seen |= set(batch.column("title").to_pylist())  # one cached row per distinct title (None too)
        want.append(len(seen) if len(seen) <= 20 else None)
        seen = seen if len(seen) <= 20 else set()
        sizes.append(None if stage._title_cache_ is None else stage._title_cache_.height)
    assert sizes == want and None in sizes and sizes[-1] is not None
    assert pc.sum(pc.is_null(batches[0].column("title"))).as_py() > 0


def test_a_small_batch_computes_its_titles_and_leaves_a_large_cache_alone():
    """One query's few titles are not looked up in a cache of many (hashing the cache would cost
    more than computing them): the values are a fresh stage's, and the cache is unchanged."""
    big = pa.table({"query_id": list(range(200)), "query": ["drill"] * 200,
                    "title": [f"Ironvale {n} in. drill bit" for n in range(200)]})
    small = pa.table({"query_id": [7, 7], "query": ["red drill"] * 2, "title": ["Red 5 ft. drill", "Ironvale 3 in. drill bit"]})
    stage = TextMatchFeatures(features=["overlap", "title_len", "stem_coverage"])
    stage(big)
    cached = stage._title_cache_
    assert cached.height == 200
    assert stage(small).equals(TextMatchFeatures(features=["overlap", "title_len", "stem_coverage"])(small))
    assert stage._title_cache_ is cached
