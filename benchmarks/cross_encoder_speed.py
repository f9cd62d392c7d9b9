"""Speed of ``rerank.cross_encoder``'s scoring against bare ``CrossEncoder.predict``, by depth and precision.

Issue 17 item 1's speed sweep: (query, title) pairs per second for a cross-encoder of the first
``--layers`` layers of all-MiniLM-L6-v2 (the weights do not matter for speed: untrained heads),
run through the whole stage (Arrow table of ``max(--k)`` candidates per query in, re-ranked
table out) and by the bare library's ``CrossEncoder.predict`` on the same pairs (``overhead_ratio``
= stage seconds / bare seconds), in fp32 and (on a CPU with AVX512-BF16/AMX) bf16, timed
interleaved in one process so that load on the machine hits every variant alike. From pairs/s it
derives the queries/s the stage alone allows at each ``--k`` (k pairs per query). Prints JSON::

    python benchmarks/cross_encoder_speed.py                      # Home Depot pairs when ../shared/data exists
    python benchmarks/cross_encoder_speed.py --n 256 --layers 1 2 6 --k 5 10 20 50

Pairs are the first ``--n`` judgments of ``../shared/data/homedepot`` (query, judged title) when
present, else demo-catalog titles with their first two words as the query.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench.timing import interleaved, write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "homedepot"


def _pairs(n: int) -> tuple[list[str], list[str], str]:
    import pyarrow.parquet as pq

    if DATA.exists():
        j = pq.read_table(DATA / "judgments_train.parquet", columns=["query", "product_id"]).slice(0, n)
        cat = pq.read_table(DATA / "catalog.parquet", columns=["product_id", "title"])
        titles = dict(zip(cat.column("product_id").to_pylist(), cat.column("title").to_pylist()))
        return j.column("query").to_pylist(), [titles.get(p) or "" for p in j.column("product_id").to_pylist()], "homedepot"
    from pipeline.demo_data import generate_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_data(Path(tmp), n_items=n, n_queries=10, seed=0)
        t = pq.read_table(Path(tmp) / "catalog.parquet", columns=["title"]).column("title").to_pylist()[:n]
    return [" ".join(x.split()[:2]) for x in t], t, "demo"


def _long_form(queries: list[str], titles: list[str], k: int):
    """The pairs as a stage input: ``k`` candidates per query id (query text per row), ranks 1..k."""
    import numpy as np
    import pyarrow as pa

    n = len(queries)
    return pa.table({"query_id": pa.array(np.arange(n) // k, pa.int64()), "query": queries, "title": titles,
                     "item_id": pa.array(np.arange(n), pa.int64()),
                     "score": pa.array(-np.arange(n, dtype=np.float32) % k, pa.float32()),
                     "rank": pa.array(np.arange(n) % k + 1, pa.int32())})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="pairs per timed call")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 6])
    ap.add_argument("--k", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import torch

    from stages.cross_encoder import CrossEncoderReranker, cpu_has_bf16, save_untrained

    if args.threads:
        torch.set_num_threads(args.threads)
    queries, titles, source = _pairs(args.n)
    pairs = list(zip(queries, titles))
    precisions = ["fp32"] + (["bf16"] if cpu_has_bf16() else [])
    report = {"pairs": len(pairs), "source": source, "torch_threads": torch.get_num_threads(),
              "cpu_bf16": cpu_has_bf16(), "max_length": args.max_length, "batch_size": args.batch_size,
              "load_average_before": os.getloadavg()[0], "variants": []}
    n_q = max(1, len(pairs) // max(args.k))
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_untrained(Path(tmp) / f"ce-{layers}", layers=layers, max_length=args.max_length)
            for precision in precisions:
                stage = CrossEncoderReranker(model=str(folder), k=max(args.k), batch_size=args.batch_size,
                                             max_length=args.max_length, precision=precision, device="cpu")
                stage.warm_up()
                ce = stage.model_
                table = _long_form(queries, titles, max(args.k))
                run_stage = (lambda: stage(table))
                bare = (lambda: ce.predict(pairs, batch_size=args.batch_size, show_progress_bar=False,
                                           activation_fn=torch.nn.Identity()))
                t_stage, t_bare = interleaved([run_stage, bare], args.repeats)
                pps = len(pairs) / t_stage
                report["variants"].append({
                    "layers": layers, "precision": precision, "stage_pairs_per_s": round(pps, 1),
                    "bare_pairs_per_s": round(len(pairs) / t_bare, 1), "overhead_ratio": round(t_stage / t_bare, 3),
                    "stage_queries_per_s": {str(k): round(pps / k, 1) for k in args.k}})
                print(report["variants"][-1], file=sys.stderr, flush=True)
    report["queries"] = n_q
    report["load_average_after"] = os.getloadavg()[0]
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
