"""The Home Depot configs agree where they share artifacts (no data needed: configs only)."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from pipeline.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "homedepot"

#: what fast.toml changes in pipeline.toml (README, "Timings"): its own folders for what depends on
#: the dropped source or on the encoder's precision; everything else is shared and must match
FAST_FOLDERS = {"artifacts/index-encoder-v3": "artifacts/fast/index-encoder-v3",
                "artifacts/main/item_stats": "artifacts/fast/item_stats",
                "artifacts/main/ranker": "artifacts/fast/ranker"}


def _stages(name: str) -> list[dict]:
    return tomllib.loads((EXAMPLES / name).read_text())["stages"]


def test_fast_toml_is_pipeline_toml_without_the_stock_encoder():
    want = copy.deepcopy(_stages("pipeline.toml"))
    fused = next(s for s in want if s["type"] == "recall.fused")["params"]
    fused["sources"] = [s for s in fused["sources"] if s["name"] != "base"]
    dense = fused["sources"][0]["stages"]
    dense[0]["params"]["precision"] = "auto"
    for source in fused["sources"]:  # 150 candidates per source instead of 200
        source["stages"][-1]["params"]["k"] = 150
    for stage in [*dense, *want]:
        for key in ("index", "stats", "model"):
            if stage.get("params", {}).get(key) in FAST_FOLDERS:
                stage["params"][key] = FAST_FOLDERS[stage["params"][key]]
    next(s for s in want if s["type"] == "rank.lightgbm")["params"].update(n_estimators=70, learning_rate=0.1)
    features = next(s for s in want if s["type"] == "features.text")["params"]
    features["sources"] = [s for s in features["sources"] if s != "base"]
    assert _stages("fast.toml") == want


def test_fast_toml_builds_with_checked_schemas():
    pipe = load_config(EXAMPLES / "fast.toml").build()
    assert [s.name for s in pipe][-2:] == ["rank.lightgbm", "display.topn"]
    assert "score_base" not in pipe.output_schema.names and "score_bm25" in pipe.output_schema.names
