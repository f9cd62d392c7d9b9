"""Micro-benchmark of torch k-NN search (indexes/torch_search.py) on a GPU: queries/s and recall.

Issue 14's target on an H200: >= 80,000 queries/s at 1M x 384, k=100, recall@100 against exact
fp32 search >= 0.999. This script measures exactly that for each storage type, next to faiss'
exact search (faiss-gpu when installed, else faiss-cpu on a sample of the queries), and prints
one JSON object::

    python benchmarks/torch_knn.py                      # 1M x 384, k=100, 65,536 queries, cuda
    python benchmarks/torch_knn.py --n 10000000 --storage fp16 int8 --out results/knn.json
    python benchmarks/torch_knn.py --device cpu --n 50000 --queries 2048   # a smoke run anywhere

The catalog is synthetic: ``--clusters`` Gaussian clusters in ``--dim`` dimensions, L2-normalised
(sentence embeddings are normalised and clustered too), generated on the device with a fixed
seed; ``--vectors file.npy`` uses real vectors instead. Exact fp32 neighbours of the first
``--exact-queries`` queries are the reference for recall. Timings repeat each search
``--repeats`` times after one warm-up run and keep the best.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench.timing import best_time, device_sync, write_report  # noqa: E402


def _catalog(args, torch, device):
    if args.vectors:
        x = np.load(args.vectors).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    gen = torch.Generator(device=device).manual_seed(0)
    centers = torch.randn(args.clusters, args.dim, generator=gen, device=device)
    out = np.empty((args.n, args.dim), np.float32)
    for s in range(0, args.n, 1 << 20):
        m = min(1 << 20, args.n - s)
        which = torch.randint(args.clusters, (m,), generator=gen, device=device)
        block = centers[which] + 0.6 * torch.randn(m, args.dim, generator=gen, device=device)
        out[s:s + m] = torch.nn.functional.normalize(block, dim=1).cpu().numpy()
    return out


def _queries(x, count, seed=1):
    rng = np.random.default_rng(seed)
    q = x[rng.integers(len(x), size=count)] + 0.3 * rng.standard_normal((count, x.shape[1])).astype(np.float32) / np.sqrt(x.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _recall(ref, got):
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ref, got)]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="catalog vectors (default 1M)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--queries", type=int, default=65_536, help="queries timed per storage type")
    parser.add_argument("--exact-queries", type=int, default=2_048, help="queries with exact fp32 reference")
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--vectors", help=".npy file of catalog vectors instead of synthetic ones")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--storage", nargs="+", default=["fp16", "bf16", "int8", "fp32"])
    parser.add_argument("--query-batch", type=int, default=4_096)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--oversample", type=int, default=None)
    parser.add_argument("--nlist", type=int, default=0, help="also time an IVF partition (torch k-means) with --nprobe")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    import faiss
    import torch

    from indexes.torch_search import DEFAULT_CHUNK_SIZE, DEFAULT_OVERSAMPLE, TorchSearch, kmeans

    sync = device_sync(args.device)
    if sync is None:
        print("torch_knn: error: --device cuda but torch sees no CUDA device (use --device cpu for a smoke run)",
              file=sys.stderr)
        return 2
    x = _catalog(args, torch, args.device if args.vectors is None else "cpu")
    q = _queries(x, args.queries)
    q_dev = torch.from_numpy(q).to(args.device)
    exact_q = q[:args.exact_queries]
    ref = TorchSearch(x, device=args.device, storage="fp32").search(exact_q, args.k)[1]  # fp32 matmul: exact
    report = {
        "n": len(x), "dim": x.shape[1], "k": args.k, "queries": len(q), "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__, "faiss": faiss.__version__, "faiss_gpu": hasattr(faiss, "StandardGpuResources"),
        "query_batch": args.query_batch, "chunk_size": args.chunk_size or DEFAULT_CHUNK_SIZE,
        "oversample": args.oversample or DEFAULT_OVERSAMPLE, "results": [],
    }
    options = {"query_batch": args.query_batch}
    if args.chunk_size:
        options["chunk_size"] = args.chunk_size
    if args.oversample:
        options["oversample"] = args.oversample
    runs = [(storage, None) for storage in args.storage]
    partition = None
    if args.nlist:
        partition = kmeans(x, args.nlist, device=args.device)
        runs += [(storage, args.nprobe) for storage in args.storage]
    for storage, nprobe in runs:
        extra = {"lists": partition[0], "centroids": partition[1]} if nprobe else {}
        search = TorchSearch(x, device=args.device, storage=storage, **options, **extra)
        seconds = best_time(lambda: search.search(q_dev, args.k, nprobe=nprobe), args.repeats, sync)
        got = search.search(exact_q, args.k, nprobe=nprobe)[1]
        report["results"].append({"engine": "torch", "storage": storage, "nprobe": nprobe,
                                  "queries_per_s": round(len(q) / seconds), f"recall@{args.k}": _recall(ref, got),
                                  "stored_gib": round(search.nbytes / 2**30, 3)})
        print(json.dumps(report["results"][-1]), file=sys.stderr)
        del search
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    engine = "faiss-cpu"
    if hasattr(faiss, "StandardGpuResources") and args.device.startswith("cuda"):
        flat, engine = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, flat), "faiss-gpu"
    sample = q if engine == "faiss-gpu" else q[:min(len(q), 4_096)]
    seconds = best_time(lambda: flat.search(sample, args.k), 1, sync)
    report["results"].append({"engine": engine, "storage": "fp32", "queries_per_s": round(len(sample) / seconds),
                              f"recall@{args.k}": _recall(ref, flat.search(exact_q, args.k)[1])})
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
