"""`funnel validate`: data-quality checks, thresholds, exit codes and the written report."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.validate import DEFAULT_THRESHOLDS, Limit, load_thresholds, normalise_title, validate_file

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["validate", *map(str, args)])
    return result.exit_code, result.output


def checks(report, name: str) -> dict:
    """Check name -> {column: check} (column None for table-wide checks)."""
    return {c.column: c for c in report.checks if c.name == name}


def write(path: Path, table: pa.Table | dict) -> Path:
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), path)
    return path


@pytest.fixture
def catalog(tmp_path) -> Path:
    titles = ["Cordless Drill 12 in. White", "cordless drill, 18 in black", "CafÃ© table 3 inch", "Bad\x07bell 2 ft",
              "Tab\ufffdle 3 feet", "Salt &amp; Pepper 4 lb", "Shovel 5 lbs", 'Rake 5"', "Hammer", "Saw"]
    return write(tmp_path / "catalog.parquet", {
        "product_id": [1, 2, 3, 4, 5, 6, 7, 8, 9, 9],
        "title": titles,
        "brand": ["acme", None, None, None, None, None, None, "  ", "b", "c"],
        "price": [10.0, 11.0, 12.0, 10.5, 11.5, 12.5, 9.5, 10.2, 11.1, 1e6],
        "colors": [["red"], ["Cr\u00c3\u00a8me"], None, None, None, None, None, None, None, None],
    })


def test_catalog_checks_find_each_planted_problem(catalog):
    report = validate_file(catalog)
    assert report.kind == "catalog" and report.rows == 10
    dup = checks(report, "duplicate_id_share")["product_id"]
    assert (dup.count, dup.status) == (1, "fail")
    nulls = checks(report, "null_share")
    assert nulls["brand"].count == 7 and nulls["brand"].status == "warn"  # 6 nulls + 1 blank
    assert nulls["title"].count == 0
    enc = checks(report, "encoding_share")
    assert enc["title"].count == 3 and enc["title"].status == "fail"
    assert enc["colors"].count == 1
    assert set(report.details["encoding"]["title"]) == {"mojibake", "control characters",
                                                        "replacement character U+FFFD", "HTML entities"}
    assert checks(report, "html_entity_share")["title"].count == 1
    near = checks(report, "near_duplicate_title_share")["title"]
    assert near.count == 1 and report.details["near_duplicates"][0]["ids"] == [1, 2]
    outliers = checks(report, "outlier_share")["price"]
    assert outliers.count == 1 and report.details["numeric"]["price"]["iqr_outliers"] == 1
    units = report.details["units"]
    assert units["inch"] == {"in.": 1, "in": 1, "inch": 1, '"': 1}
    assert units["foot"] == {"ft": 1, "feet": 1} and units["pound"] == {"lb": 1, "lbs": 1}
    assert checks(report, "mixed_unit_families")[None].value == 3
    assert report.status == "fail" and report.exit_code == 4


def test_vector_columns_dimension_nan_norms_and_missing(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    good = [list(v / np.linalg.norm(v)) for v in rng.normal(size=(40, 8))]
    image = good[:34] + [None, [], [1.0] * 7, [float("nan")] * 8, [0.0] * 8, [500.0] * 8]
    path = write(tmp_path / "items.parquet", pa.table({
        "item_id": list(range(40)), "image": pa.array(image, pa.list_(pa.float32())),
        "clip": pa.array(good, pa.list_(pa.float32(), 8))}))
    report = validate_file(path)
    assert report.kind == "catalog" and report.status == "fail"
    assert checks(report, "missing_vector_share")["image"].count == 2
    dim = checks(report, "vector_dimension_share")["image"]
    assert dim.status == "fail" and dim.count == 1 and "not 8 (the most common)" in dim.message and "7: 1" in dim.message
    assert checks(report, "non_finite_vector_share")["image"].count == 1
    assert checks(report, "zero_norm_vector_share")["image"].status == "warn"
    assert checks(report, "odd_norm_vector_share")["image"].count == 1          # the norm-1414 vector
    assert report.details["vectors"]["image"]["dimension"] == 8
    fixed = {name: c.status for name in ("missing_vector_share", "vector_dimension_share", "non_finite_vector_share",
                                         "zero_norm_vector_share", "odd_norm_vector_share")
             for col, c in checks(report, name).items() if col == "clip"}
    assert set(fixed.values()) == {"pass"} and len(fixed) == 5               # fixed-size lists are checked too
    assert report.details["vectors"]["clip"]["norm"]["median"] == pytest.approx(1.0, abs=1e-6)
    declared = validate_file(path, vector_columns=["photo"])
    assert "vector column 'photo' is declared" in checks(declared, "missing_column")["photo"].message
    code, out = cli(path, "--vector-column", "item_id")
    assert code == 4 and "vector column 'item_id' must be a list of floats" in out
    code, out = cli(path)
    assert code == 4 and "vector_dimension_share" in out and "column 'image'" in out


def test_vector_columns_are_read_a_batch_at_a_time(tmp_path, monkeypatch):
    """A catalog's vector columns are never loaded whole: the frame of the other checks leaves them
    out, and batches of 7 rows give the report one batch gives (nulls of a vector column included)."""
    import numpy as np

    import pipeline.validate as validate

    rng = np.random.default_rng(1)
    image = [list(v) for v in rng.normal(size=(30, 4))] + [None, [float("nan")] * 4, [0.0] * 4]
    path = write(tmp_path / "items.parquet", pa.table({"item_id": list(range(33)), "title": ["t"] * 33,
                                                       "image": pa.array(image, pa.list_(pa.float32()))}))
    read = []
    real_read = validate._read
    monkeypatch.setattr(validate, "_read", lambda *a, **k: read.append(a[2]) or real_read(*a, **k))
    whole = validate.validate_file(path)
    assert read == [["item_id", "title"]] and whole.columns["image"] == "List(Float32)"
    monkeypatch.setattr(validate, "VECTOR_BATCH_ROWS", 7)
    batched = validate.validate_file(path)
    assert batched.checks == whole.checks
    assert batched.details["vectors"] == whole.details["vectors"]
    assert checks(whole, "null_share")["image"].count == 1 and whole.details["null_share"]["image"] == 1 / 33
    assert checks(whole, "non_finite_vector_share")["image"].count == 1


def test_normalised_titles_drop_case_punctuation_sizes_and_colours():
    titles = pl.Series(["Cordless Drill, 12 in. - White", "cordless drill 18-in BLACK", "Cordless Drill (XL)",
                        "Cordless Saw 12 in."])
    keys = pl.DataFrame({"t": titles}).select(normalise_title(pl.col("t"))).to_series().to_list()
    assert keys[0] == keys[1] == keys[2] == "cordlessdrill"
    assert keys[3] == "cordlesssaw"


def test_judgments_labels_imbalance_queries_without_relevant_and_unknown_items(tmp_path):
    items = write(tmp_path / "items.parquet", {"item_id": [1, 2, 3], "title": ["a", "b", "c"]})
    path = write(tmp_path / "j.parquet", {
        "query_id": [1, 1, 2, 2, 3, 3, 3],
        "query": ["drill", "drill", "saw", "saw", "nail", "nail", "nail"],
        "product_id": [1, 2, 1, 3, 1, 9, 9],
        "relevance": [3.0, 1.0, 2.33, 1.0, 2.67, 1.33, 1.33],
    })
    code, output = cli(path, "--catalog", items, "--all")
    assert "judgments, 7 rows" in output
    report = validate_file(path, items=items)
    assert report.details["labels"] == {"1": 2, "1.33": 2, "2.33": 1, "2.67": 1, "3": 1}
    imbalance = checks(report, "label_imbalance")[None]
    assert imbalance.value == pytest.approx(5 / 2)
    none = checks(report, "no_relevant_query_share")[None]
    assert (none.count, none.total, none.status) == (1, 3, "warn")
    assert checks(report, "duplicate_row_share")[None].count == 1
    unknown = checks(report, "unknown_item_share")["product_id"]
    assert (unknown.count, unknown.status) == (2, "fail") and report.details["unknown_items"]["examples"] == ["9"]
    assert code == 4 and output.rstrip().endswith("result: FAIL (exit 4)")


def test_nan_relevance_and_null_ids_fail(tmp_path):
    path = write(tmp_path / "j.parquet", {"query_id": [1, None], "item_id": [1, 2], "relevance": [float("nan"), 2.0]})
    report = validate_file(path, "judgments")
    assert checks(report, "non_finite_share")["relevance"].status == "fail"
    assert checks(report, "null_id_share")["query_id"].status == "fail"


def test_sequences_short_and_unknown_items(tmp_path):
    items = write(tmp_path / "items.parquet", {"item_id": ["a", "b", "c"]})
    path = write(tmp_path / "s.parquet", {"user_id": ["u1", "u2", "u3", "u3", "u4", "u5"],
                                          "items": [["a", "b", "c"], ["a"], ["a", "zz"], ["b", "c"], [], ["c", None]]})
    report = validate_file(path, items=items)
    assert report.kind == "sequences"
    assert checks(report, "short_sequence_share")["items"].count == 2
    assert checks(report, "duplicate_id_share")["user_id"].count == 1
    inner = checks(report, "null_id_share")["items[]"]
    assert (inner.count, inner.total, inner.status) == (1, 10, "fail")
    unknown = checks(report, "unknown_item_share")["items"]
    assert (unknown.count, unknown.total) == (1, 9)
    assert report.details["sequence_length"]["max"] == 3


def test_interactions_duplicates_and_unknown_items(tmp_path):
    items = write(tmp_path / "items.parquet", {"item_id": [1, 2]})
    path = write(tmp_path / "i.parquet", {"user_id": ["u1", "u1", "u2"], "item_id": [1, 1, 5], "ts": [1, 1, 2]})
    report = validate_file(path, items=items)
    assert report.kind == "interactions"
    assert checks(report, "duplicate_row_share")[None].count == 1
    assert checks(report, "unknown_item_share")["item_id"].count == 1


def test_binary_text_is_reported_not_crashed_on(tmp_path):
    path = write(tmp_path / "c.parquet", pa.table({"item_id": [1, 2, 3],
                                                   "title": pa.array([b"ok", b"\xff\xfe bad", b"fine"], pa.binary())}))
    report = validate_file(path)
    wrong = checks(report, "missing_column")["title"]
    assert wrong.status == "fail" and "binary" in wrong.message.lower() and "limit" not in wrong.message
    assert checks(report, "encoding_share")["title"].count == 1


def test_empty_file_and_missing_columns_fail(tmp_path):
    empty = write(tmp_path / "e.parquet", pa.table({"item_id": pa.array([], pa.int64())}))
    code, output = cli(empty)
    assert code == 4 and "the file has no rows" in output
    no_rel = write(tmp_path / "j.parquet", {"query_id": [1], "item_id": [1], "grade": [3.0]})
    code, output = cli(no_rel, "--kind", "judgments")
    assert code == 4 and "needs column 'relevance'" in output


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b"not parquet"), "not readable as Parquet"),
    (lambda p: write(p, {"x": [1], "y": ["a"]}), "pass --kind"),
])
def test_files_that_cannot_be_checked_are_one_line_errors(tmp_path, make, expected):
    path = tmp_path / "in.parquet"
    make(path)
    code, output = cli(path)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("funnel: error:") and expected in lines[-1], output


def test_thresholds_from_a_file_and_options(catalog, tmp_path):
    relaxed = tmp_path / "t.toml"
    relaxed.write_text("[duplicate_id_share]\nfail = 0.5\n[encoding_share]\nwarn = false\nfail = false\n"
                       "[null_share]\nwarn = 0.9\n[near_duplicate_title_share]\nwarn = 0.5\n[outlier_share]\nwarn = 0.5\n"
                       "[html_entity_share]\nwarn = false\n")
    limits = load_thresholds(relaxed)
    assert limits["encoding_share"] == Limit(None, None) and limits["null_share"] == Limit(0.9, None)
    assert limits["label_imbalance"] == DEFAULT_THRESHOLDS["label_imbalance"]
    code, output = cli(catalog, "--thresholds", relaxed)
    assert code == 0 and "result: PASS (exit 0)" in output, output
    code, output = cli(catalog, "--thresholds", relaxed, "--max-null-share", 0.5)
    assert code == 4 and "column 'brand': 7 of 10 null or blank (70.00%) > 50.00%" in output


@pytest.mark.parametrize("text, expected", [
    ("[nul_share]\nwarn = 1\n", "unknown check [nul_share]"),
    ("[null_share]\nwarn = -1\n", "must be a number >= 0 or false"),
    ("[null_share]\nmax = 1\n", "takes only 'warn' and 'fail'"),
    ("[null_share\n", "not valid TOML"),
])
def test_bad_thresholds_file_is_a_one_line_error(catalog, tmp_path, text, expected):
    bad = tmp_path / "t.toml"
    bad.write_text(text)
    code, output = cli(catalog, "--thresholds", bad)
    assert code == 2 and output.strip().splitlines()[-1].startswith("funnel: error: thresholds file") and expected in output


def test_report_folder_has_json_markdown_and_plots(catalog, tmp_path):
    out = tmp_path / "report"
    code, output = cli(catalog, "--report", out)
    assert code == 4
    data = json.loads((out / "report.json").read_text())
    assert data["status"] == "fail" and data["exit_code"] == 4 and data["kind"] == "catalog"
    assert {c["name"] for c in data["checks"]} >= {"duplicate_id_share", "encoding_share", "near_duplicate_title_share"}
    page = (out / "report.md").read_text()
    for png in ("null_share.png", "numeric.png", "units.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in page
    assert "## Encoding problems" in page and "## Largest near-duplicate title groups" in page
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_unwritable_report_folder_is_an_error_and_writes_nothing(catalog, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, output = cli(catalog, "--report", blocker / "report")
    assert code == 2 and output.strip().splitlines()[-1].startswith("funnel: error: cannot write the report"), output
    assert blocker.read_text() == "x"


def test_help_documents_checks_and_exit_codes():
    result = CliRunner().invoke(main, ["validate", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "0 pass, 3 warn, 4 fail" in text and "near_duplicate_title_share" in text and "--max-null-share" in text


REAL = [
    ("homedepot/catalog.parquet", "catalog", []),
    ("homedepot/judgments_train.parquet", "judgments", ["--catalog", "homedepot/catalog.parquet"]),
    ("amazon_beauty/items.parquet", "catalog", []),
    ("amazon_beauty/sequences_train.parquet", "sequences", ["--items", "amazon_beauty/items.parquet"]),
]


@pytest.mark.realdata
@pytest.mark.parametrize("name, kind, extra", REAL, ids=[r[0] for r in REAL])
def test_real_data_sets_validate(tmp_path, name, kind, extra):
    extra = [SHARED / a if a.endswith(".parquet") else a for a in extra]
    code, output = cli(SHARED / name, *extra, "--report", tmp_path / "r")
    assert code in (0, 3), output
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["kind"] == kind and data["rows"] > 10_000
    assert not [c for c in data["checks"] if c["status"] == "fail"]
    if kind != "catalog":
        assert next(c for c in data["checks"] if c["name"] == "unknown_item_share")["count"] == 0
