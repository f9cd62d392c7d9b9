"""Shared fixtures: a small generated shop with every artifact built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    from pipeline.device import cuda_available

    skip_gpu = pytest.mark.skip(reason="no CUDA device visible (gpu tests run on a CUDA machine)")
    skip_data = pytest.mark.skip(reason=f"real data folder {SHARED_DATA} is absent")
    has_cuda = None
    for item in items:
        if "gpu" in item.keywords:
            if has_cuda is None:
                has_cuda = cuda_available()
            if not has_cuda:
                item.add_marker(skip_gpu)
        if "realdata" in item.keywords and not SHARED_DATA.exists():
            item.add_marker(skip_data)


@pytest.fixture(scope="session")
def demo_shop(tmp_path_factory):
    """A built demo pipeline folder: data/, pipeline.toml, artifacts/ (index, items, ranker)."""
    from pipeline.build import build_artifacts
    from pipeline.config import load_config
    from pipeline.demo import demo_config
    from pipeline.demo_data import generate_demo_data

    root = tmp_path_factory.mktemp("shop")
    generate_demo_data(root / "data", n_items=600, n_queries=150, seed=1)
    cfg = demo_config()
    cfg.save(root / "pipeline.toml")
    build_artifacts(load_config(root / "pipeline.toml"), progress=False, log=lambda m: None)
    return root


@pytest.fixture(scope="session")
def demo_pipeline(demo_shop):
    """The demo pipeline, warmed up (shared: do not mutate)."""
    from pipeline.config import load_config

    return load_config(demo_shop / "pipeline.toml").build().warm_up()


@pytest.fixture(scope="session")
def demo_queries(demo_shop):
    import pyarrow.parquet as pq

    return pq.read_table(demo_shop / "data" / "queries.parquet").slice(0, 12)


@pytest.fixture(scope="session")
def stage_inputs(demo_pipeline, demo_queries):
    """The input each stage of the demo pipeline sees, for the queries above (list by step)."""
    inputs, table = [], demo_queries
    for stage in demo_pipeline.stages:
        inputs.append(table)
        table = stage(table)
    return inputs
