"""The encoder stage against bare ``SentenceTransformer.encode`` on the same titles, in one run.

Issue 14 item 2's measurement: titles/s of ``encode.sentence_transformers`` (fp32, bf16, fp16)
and of the bare library (fp32, and with fp16 weights), and each stage precision's cosine to
the CPU fp32 embeddings. Target on an H200: stage >= 20,000 titles/s and >= 2x bare fp32,
cosine >= 0.999. Prints one JSON object::

    python benchmarks/gpu_encoder.py                         # 50,000 demo titles, batch 1,024, cuda
    python benchmarks/gpu_encoder.py --titles ../shared/data/homedepot/catalog.parquet --column title
    python benchmarks/gpu_encoder.py --device cpu --n 2000 --batch-size 64  # a smoke run anywhere

Titles default to the demo catalog generator's (``pipeline.demo_data``), ``--n`` of them. Each
timing is the best of ``--repeats`` runs after one warm-up run; the CPU reference for the cosine
uses the first ``--reference`` titles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench.timing import best_time, device_sync, write_report  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _titles(args) -> list[str]:
    import pyarrow.parquet as pq

    if args.titles:
        return pq.read_table(args.titles, columns=[args.column]).column(args.column).to_pylist()[:args.n]
    from pipeline.demo_data import generate_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_demo_data(Path(tmp), n_items=args.n, n_queries=1)
        return pq.read_table(paths["catalog"], columns=["title"]).column("title").to_pylist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--titles", help="Parquet file with the texts (default: demo catalog titles)")
    parser.add_argument("--column", default="title")
    parser.add_argument("--batch-size", type=int, default=1_024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", type=int, default=2_000)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    from stages.sentence_transformers import SentenceTransformerEncoder, resolve_model

    sync = device_sync(args.device)
    if sync is None:
        print("gpu_encoder: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    titles = _titles(args)
    ref = SentenceTransformerEncoder(device="cpu").encode_texts(titles[:args.reference])
    report = {"titles": len(titles), "batch_size": args.batch_size, "device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "results": []}
    path, _ = resolve_model("all-MiniLM-L6-v2")
    for name, half in (("bare fp32", False), ("bare fp16 weights", True)):
        if half and args.device != "cuda":
            continue
        bare = SentenceTransformer(path, device=args.device)
        if half:
            bare.half()
        seconds = best_time(lambda: bare.encode(titles, batch_size=args.batch_size, normalize_embeddings=True), args.repeats, sync)
        report["results"].append({"engine": name, "titles_per_s": round(len(titles) / seconds)})
        del bare
    bare_fp32 = report["results"][0]["titles_per_s"]
    for precision in args.precisions:
        if precision == "fp16" and args.device != "cuda":
            continue
        stage = SentenceTransformerEncoder(device=args.device, precision=precision, batch_size=args.batch_size)
        stage.warm_up()
        seconds = best_time(lambda: stage.encode_texts(titles), args.repeats, sync)
        got = stage.encode_texts(titles[:args.reference])
        rate = round(len(titles) / seconds)
        report["results"].append({"engine": f"stage {precision}", "titles_per_s": rate,
                                  "vs_bare_fp32": round(rate / bare_fp32, 2),
                                  "min_cosine_vs_cpu_fp32": float((got * ref).sum(axis=1).min())})
        print(json.dumps(report["results"][-1]), file=sys.stderr)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
