"""Display: near-duplicate variants (same product in another size or colour) collapsed per query."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from pipeline import ConfigError
from pipeline.testing import CHECKS, StageCase
from stages.display import TopNDisplay

TITLES = ["Delta Vero 1-Handle Shower Faucet in Chrome", "Philips 60-Watt Equivalent A19 LED Light Bulb (4-Pack)",
          "Delta Vero 1-Handle Shower Faucet in Brushed Nickel", "House of Fara 3/4 in. x 3 in. x 7 ft. MDF Casing",
          "House of Fara 3/4 in. x 4 in. x 7 ft. MDF Casing", "Philips 40-Watt Equivalent A19 LED Light Bulb",
          "12 in.", None]


def _candidates():
    n = len(TITLES)
    return pa.table({"query_id": [1] * n + [2] * 2, "title": TITLES + TITLES[:2],
                     "brand": ["Delta", "Philips", "Delta", "Fara", "Fara", "Philips", None, None, "Delta", "Philips"],
                     "score": pa.array([float(n - i) for i in range(n)] + [2.0, 1.0], pa.float32()),
                     "rank": pa.array(list(range(1, n + 1)) + [1, 2], pa.int32())})


def test_variant_keys_drop_sizes_and_colours():
    keys = pl.DataFrame({"t": TITLES}).select(TopNDisplay(variant_key="title").variant_keys(pl.col("t"))).to_series()
    assert keys[0] == keys[2] == "delta vero 1 handle shower faucet in"
    assert keys[3] == keys[4] == "house of fara mdf casing"
    assert keys[1] == keys[5] == "philips equivalent a19 led light bulb"
    assert keys[6] is None and keys[7] is None


def test_best_variant_is_kept_and_the_cap_applies_after():
    out = TopNDisplay(n=10, variant_key="title")(_candidates()).to_pylist()
    q1 = [r["title"] for r in out if r["query_id"] == 1]
    assert q1 == [TITLES[0], TITLES[1], TITLES[3], "12 in.", None]
    assert [r["rank"] for r in out if r["query_id"] == 1] == [1, 2, 3, 4, 5]
    capped = TopNDisplay(n=10, variant_key="title", cap_column="brand", cap=1)(_candidates()).to_pylist()
    assert [r["title"] for r in capped if r["query_id"] == 1] == [TITLES[0], TITLES[1], TITLES[3], "12 in.", None]


def test_custom_pattern_and_bad_pattern():
    out = TopNDisplay(n=10, variant_key="title", variant_pattern=r"\bin\b.*$")(_candidates()).to_pylist()
    assert [r["title"] for r in out if r["query_id"] == 1][:2] == [TITLES[0], TITLES[1]]
    with pytest.raises(ConfigError, match="'variant_pattern' parameter"):
        TopNDisplay(variant_key="title", variant_pattern="(unclosed").validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_display_with_variants_conforms(check):
    CHECKS[check](StageCase(TopNDisplay(n=3, variant_key="title", cap_column="brand", cap=2), _candidates()))


def test_empty_pattern_collapses_identical_titles_only():
    table = pa.table({"query_id": [1] * 5,
                      "title": ["Delta Vero Faucet in Chrome", "DELTA Vero Faucet in Chrome ", "Delta Vero Faucet in Nickel",
                                "Delta Vero Faucet, in Chrome", "Philips 60-Watt LED Bulb"],
                      "score": pa.array([5.0, 4.0, 3.0, 2.0, 1.0], pa.float32()),
                      "rank": pa.array([1, 2, 3, 4, 5], pa.int32())})
    out = TopNDisplay(n=10, variant_key="title", variant_pattern="")(table)
    assert out.column("title").to_pylist() == ["Delta Vero Faucet in Chrome", "Delta Vero Faucet in Nickel",
                                               "Philips 60-Watt LED Bulb"]
    assert out.column("rank").to_pylist() == [1, 2, 3]


def test_variant_keys_cached_between_batches_give_the_lists_of_a_fresh_stage(monkeypatch):
    """Each title's variant key is kept for later batches (bounded); every batch's list equals
    that of a stage that never saw another batch, before and after the cache starts over."""
    import stages.display as display

    monkeypatch.setattr(display, "TITLE_CACHE_MAX", 6)
    base = _candidates()
    batches = [base, base.slice(0, 4), base.slice(0, 0), base.slice(3),
               base.set_column(1, "title", pa.array([t.upper() if t else t for t in base.column("title").to_pylist()]))]
    stage = TopNDisplay(n=3, variant_key="title")
    sizes = []
    for batch in batches:
        assert stage(batch).equals(TopNDisplay(n=3, variant_key="title")(batch))
        sizes.append(None if stage._key_cache_ is None else stage._key_cache_.height)
    # 8 distinct titles (None included) > 6: dropped at once; then 4, still 4, 4 + 4 new > 6, 8 new > 6
    assert sizes == [None, 4, 4, None, None]
