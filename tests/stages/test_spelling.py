"""query.spelling: catalog-vocabulary spelling correction before recall."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ArtifactError, ConfigError, PipelineConfig
from pipeline.build import build_artifacts
from pipeline.config import load_config
from pipeline.testing import CHECKS, StageCase
from stages.spelling import SpellingCorrector

TITLES = ["Ceiling Fan with Light Kit", "52 in. Ceiling Fan in White", "Ceiling Fan Downrod", "Crystal Chandelier",
          "12-Light Chandelier in Bronze", "Bronze Chandelier with Shades", "Wall Oven 30 in.", "Double Wall Oven",
          "Wall Oven Trim Kit", "LED Tube Light 48 in.", "LED Shop Light", "Bronze Shower Head", "Rain Shower Head",
          "Handheld Shower Head Kit", "Xtreme9000 Pressure Washer", "Shackle for Chain", "Panel Wall Light"]
CATALOG = pa.table({"product_id": list(range(100, 100 + len(TITLES))), "title": TITLES,
                    "brand": ["Hampton Bay"] * 3 + ["Kichler"] * 14})
SPELLING = {"vocabulary": "artifacts/spelling", "item_text": ["title", "brand"], "min_count": 2}


def _config(tmp_path, stages):
    pq.write_table(CATALOG, tmp_path / "catalog.parquet")
    cfg = PipelineConfig(stages=stages, data={"catalog": "catalog.parquet"})
    cfg.save(tmp_path / "p.toml")
    return load_config(tmp_path / "p.toml")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("spelling")
    logs = []
    cfg = _config(root, [{"type": "query.spelling", "params": SPELLING}])
    pipe = build_artifacts(cfg, progress=False, log=logs.append)
    return root, cfg, pipe.stages[0], logs


def _fix(stage, *queries):
    out = stage(pa.table({"query_id": list(range(len(queries))), "query": list(queries)}))
    return out.column("query").to_pylist()


def test_misspelt_words_become_catalog_words(built):
    stage = built[2]
    assert _fix(stage, "celing fan", "bronze chandilier", "rain shwer head") == \
        ["ceiling fan", "bronze chandelier", "rain shower head"]


def test_glued_words_are_split(built):
    assert _fix(built[2], "double walloven", "rain showerhead") == ["double wall oven", "rain shower head"]


def test_known_words_numbers_units_and_short_words_are_kept(built):
    # known words keep their case; "shackles" shares its stem with "shackle"; units and model
    # numbers (letters glued to digits) and words under min_length are never touched
    queries = ["Ceiling FAN 52 in.", "chain shackles", "48 inches led", "xtreme9000 washr", "wal ovn"]
    assert _fix(built[2], *queries) == ["Ceiling FAN 52 in.", "chain shackles", "48 inches led", "xtreme9000 washr",
                                        "wal ovn"]


def test_rare_words_are_not_offered(built):
    # "shackle" is in one item only (min_count 2): "shakle" has no candidate and stays as typed
    assert _fix(built[2], "shakle") == ["shakle"]
    lenient = built[2].clone(min_count=1)
    assert _fix(lenient, "shakle") == ["shackle"]


def test_original_text_kept_and_nulls_pass(built):
    out = built[2](pa.table({"query_id": [1, 2, 3], "query": ["celing fan", None, "celing fan"]})).to_pydict()
    assert out["query"] == ["ceiling fan", None, "ceiling fan"]
    assert out["query_original"] == ["celing fan", None, "celing fan"]
    again = built[2](pa.table(out))
    assert again.column("query_original").to_pylist() == ["celing fan", None, "celing fan"]
    no_copy = built[2].clone(original_column=None)
    assert no_copy(pa.table({"query_id": [1], "query": ["celing"]})).column_names == ["query_id", "query"]


def test_vocabulary_artifact_cached_and_checked(built):
    root, cfg, stage, logs = built
    manifest = json.loads((root / "artifacts" / "spelling" / "manifest.json").read_text())
    assert manifest["kind"] == "spelling-vocabulary" and manifest["items"] == len(TITLES)
    words = pq.read_table(root / "artifacts" / "spelling" / "words.parquet").to_pydict()
    assert dict(zip(words["word"], words["count"]))["chandelier"] == 3
    build_artifacts(cfg, progress=False, log=logs.append)
    assert "up to date" in logs[-1]
    other = SpellingCorrector(vocabulary=str(root / "artifacts" / "spelling"), item_text=["title"])
    with pytest.raises(ArtifactError, match="rebuild it with `funnel build`"):
        other.warm_up()
    with pytest.raises(ArtifactError, match="run `funnel build"):
        SpellingCorrector(vocabulary=str(root / "missing")).warm_up()


def test_bm25_finds_what_the_typo_hid(tmp_path):
    bm25 = {"type": "recall.bm25", "params": {"index": "artifacts/bm25", "k": 3, "item_text": ["title"]}}
    plain = build_artifacts(_config(tmp_path, [bm25]), progress=False, log=lambda m: None)
    corrected = build_artifacts(_config(tmp_path, [{"type": "query.spelling", "params": SPELLING}, bm25]),
                                progress=False, log=lambda m: None)
    query = pa.table({"query_id": [1], "query": ["chandilier"]})
    assert plain(query).num_rows == 0
    out = corrected(query).to_pydict()
    assert set(out["item_id"]) == {103, 104, 105} and set(out["query_original"]) == {"chandilier"}


def test_bad_params():
    with pytest.raises(ConfigError, match="'max_edit_distance' parameter of stage 'query.spelling'"):
        SpellingCorrector(max_edit_distance=0).validate_params()
    with pytest.raises(ConfigError, match="'item_text' parameter"):
        SpellingCorrector(item_text=[]).validate_params()
    with pytest.raises(ConfigError, match="'original_column' parameter"):
        SpellingCorrector(original_column="query").validate_params()


@pytest.mark.parametrize("check", [c for c in CHECKS if c != "cpu_gpu_parity"])
def test_spelling_conforms(built, check):
    stage = built[2].clone()
    queries = pa.table({"query_id": [1, 2, 3], "query": ["celing fan", "walloven", "LED shop light"],
                        "segment": ["a", "b", "b"]})
    CHECKS[check](StageCase(stage, queries))
