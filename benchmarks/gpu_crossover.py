"""Where the GPU starts to win: rank.lightgbm (hummingbird-ml) and filter.rules (cudf-polars)
against their CPU engines, across batch sizes.

Issue 14 item 3: ``device="auto"`` sends a batch to the GPU path of these stages only from
``stages.gpu_util.RANKER_GPU_MIN_ROWS`` / ``FILTER_GPU_MIN_ROWS`` rows. Those constants are
placeholders until this script has run on the target GPU; set them to the ``crossover_rows`` it
prints (the smallest measured batch from which the GPU path is faster at every larger size;
``null`` when it never is). Prints one JSON object::

    python benchmarks/gpu_crossover.py                      # cuda; batches 1k .. 1M rows
    python benchmarks/gpu_crossover.py --sizes 4096 262144 --trees 300
    python benchmarks/gpu_crossover.py --device cpu --sizes 1000 4000 --trees 50   # smoke run

The ranker is a lambdarank model trained on synthetic data with ``--features`` features,
``--trees`` trees of ``--leaves`` leaves (the demo's ranker: 12 features, up to 300 trees);
native LightGBM uses every CPU thread. The filter runs the demo's two rules (in stock, price
at most 1000) through the stage itself. Times are the best of ``--repeats`` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench.timing import best_time, device_sync, write_report  # noqa: E402


def crossover(rows: list[dict], key_cpu: str, key_gpu: str) -> int | None:
    """Smallest size from which the GPU's rate beats the CPU's at every larger size measured."""
    best = None
    for row in sorted(rows, key=lambda r: r["rows"], reverse=True):
        if row[key_gpu] is None or row[key_gpu] <= row[key_cpu]:
            break
        best = row["rows"]
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_024, 4_096, 16_384, 65_536, 262_144, 1_048_576])
    parser.add_argument("--features", type=int, default=12)
    parser.add_argument("--trees", type=int, default=300)
    parser.add_argument("--leaves", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-filter", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    import lightgbm as lgb
    import pyarrow as pa
    import torch

    from stages.gpu_util import FILTER_GPU_MIN_ROWS, RANKER_GPU_MIN_ROWS, TorchTreeModel
    from stages.rules import RuleFilter

    sync = device_sync(args.device)
    if sync is None:
        print("gpu_crossover: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    n_train = 200 * 50
    X = rng.standard_normal((n_train, args.features)).astype(np.float32)
    y = np.clip(np.rint(X[:, 0] + 0.5 * X[:, 1] + rng.standard_normal(n_train) * 0.5 + 1), 0, 3).astype(int)
    booster = lgb.train({"objective": "lambdarank", "num_leaves": args.leaves, "verbose": -1, "seed": 0},
                        lgb.Dataset(X, y, group=[50] * 200), num_boost_round=args.trees)
    booster = lgb.Booster(model_str=booster.model_to_string())
    trees = TorchTreeModel(booster, args.device)
    report = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "trees": booster.num_trees(), "features": args.features,
              "current": {"RANKER_GPU_MIN_ROWS": RANKER_GPU_MIN_ROWS, "FILTER_GPU_MIN_ROWS": FILTER_GPU_MIN_ROWS},
              "ranker": [], "filter": []}
    for n in args.sizes:
        batch = rng.standard_normal((n, args.features)).astype(np.float32)
        cpu = best_time(lambda: booster.predict(batch, num_threads=0), args.repeats, lambda: None)
        gpu = best_time(lambda: trees.predict(batch), args.repeats, sync)
        report["ranker"].append({"rows": n, "lightgbm_rows_per_s": round(n / cpu), "hummingbird_rows_per_s": round(n / gpu)})
        print(json.dumps(report["ranker"][-1]), file=sys.stderr)
    report["ranker_crossover_rows"] = crossover(report["ranker"], "lightgbm_rows_per_s", "hummingbird_rows_per_s")
    if not args.skip_filter:
        rules = [{"column": "in_stock", "op": "eq", "value": True}, {"column": "price", "op": "between", "max": 1000.0}]
        cpu_stage, gpu_stage = RuleFilter(rules=rules, device="cpu"), RuleFilter(rules=rules, device=args.device)
        for n in args.sizes:
            table = pa.table({"query_id": np.arange(n) // 100, "rank": (np.arange(n) % 100 + 1).astype(np.int32),
                              "in_stock": rng.random(n) < 0.9, "price": rng.uniform(1, 2000, n)})
            cpu = best_time(lambda: cpu_stage(table), args.repeats, lambda: None)
            gpu = best_time(lambda: gpu_stage(table), args.repeats, sync)
            report["filter"].append({"rows": n, "cpu_engine_rows_per_s": round(n / cpu), "gpu_engine_rows_per_s": round(n / gpu)})
            print(json.dumps(report["filter"][-1]), file=sys.stderr)
        report["filter_crossover_rows"] = crossover(report["filter"], "cpu_engine_rows_per_s", "gpu_engine_rows_per_s")
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
