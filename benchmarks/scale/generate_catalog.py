"""A product catalog of any size for the search recipe's scale benchmark (issue 20), its titles
recombined from the words of the Home Depot catalog.

    python benchmarks/scale/generate_catalog.py --products 1000000 --out /tmp/catalog-1m

writes ``OUT/catalog.parquet`` (``product_id`` int64, ``title``, ``brand``) and
``OUT/queries.parquet`` (``query_id`` int64, ``query``). Each synthetic product takes a real
title as its template: the brand's words at its start and its head noun phrase (the last two
words before `` in ``/`` with ``/``(``, e.g. "Trim Kit" in "Delta Vero 1-Handle Shower Only
Faucet Trim Kit in Chrome") are kept, every other word is swapped with probability ``--swap``
for a word drawn from the titles of the same category — those whose head noun ends in the same
word ("Kit", "Faucet", "Fan") — or, for a rare head noun, of the same brand (all titles' words
as a last resort). A query is two to four words of a generated title, its head
noun among them, so a run can be timed on queries that have answers.

The source catalog (``--source``, by default ``../shared/data/homedepot/catalog.parquet`` next
to the checkout) is read at run time and never copied: only the recombined titles are written.
Products are generated and written ``--chunk-rows`` at a time, so a million products take little
memory. Everything follows from ``--seed``.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "homedepot" / "catalog.parquet"
#: words that end a product's head noun phrase: "Faucet Trim Kit | in Chrome", "Mower | with ..."
HEAD_END = re.compile(r"^(in|with|for|\(.*)$", re.IGNORECASE)
#: a category (or brand) with fewer distinct swappable words than this draws from a wider one
MIN_WORDS = 30


class Templates:
    """The source titles split into kept and swappable words, and each brand's vocabulary."""

    def __init__(self, source: Path):
        table = pq.read_table(source, columns=["title", "brand"])
        titles = [html.unescape(t or "").split() for t in table.column("title").to_pylist()]
        brands = table.column("brand").to_pylist()
        self.words: list[list[str]] = []
        self.keep: list[np.ndarray] = []           # per template: True for a word kept as it is
        self.brands: list[str | None] = []
        self.heads: list[str] = []
        vocab: dict[tuple[str, str] | None, set[str]] = {}
        for words, brand in zip(titles, brands):
            if len(words) < 2:
                continue
            keep = np.zeros(len(words), bool)
            brand_words = (brand or "").split()
            if brand_words and words[:len(brand_words)] == brand_words:
                keep[:len(brand_words)] = True
            end = next((i for i in range(len(brand_words) + 1, len(words)) if HEAD_END.match(words[i])), len(words))
            keep[max(end - 2, 0):end] = True
            self.words.append(words)
            self.keep.append(keep)
            self.brands.append(brand)
            self.heads.append(words[max(end - 1, 0)].lower())
            swappable = {w for w, k in zip(words, keep) if not k}
            for key in (("head", self.heads[-1]), ("brand", brand or ""), None):
                vocab.setdefault(key, set()).update(swappable)
        self.vocab = {key: np.array(sorted(v), dtype=object) for key, v in vocab.items()
                      if key is None or (len(v) >= MIN_WORDS and key != ("brand", ""))}

    def __len__(self) -> int:
        return len(self.words)

    def title(self, rng: np.random.Generator, template: int, swap: float) -> tuple[str, int]:
        """A recombined title from ``template`` and the position of its head noun's last word."""
        words, keep = list(self.words[template]), self.keep[template]
        vocab = next(self.vocab[k] for k in (("head", self.heads[template]),
                                              ("brand", self.brands[template] or ""), None) if k in self.vocab)
        swapped = (~keep) & (rng.random(len(words)) < swap)
        for i, w in zip(np.flatnonzero(swapped), rng.integers(len(vocab), size=int(swapped.sum()))):
            words[i] = vocab[w]
        head = int(np.flatnonzero(keep)[-1])
        return " ".join(words), head


def query_for(rng: np.random.Generator, title: str, head: int) -> str:
    """Two to four words of ``title``: its head noun phrase's last word and one to three before it."""
    words = title.split()
    others = [i for i in range(head) if len(words[i]) > 2]
    picked = sorted(rng.choice(others, size=min(len(others), int(rng.integers(1, 4))), replace=False).tolist()) \
        if others else []
    return " ".join(words[i] for i in [*picked, head])


def generate(products: int, out: Path, *, source: Path = DEFAULT_SOURCE, queries: int = 2000, swap: float = 0.6,
             seed: int = 0, chunk_rows: int = 100_000) -> dict:
    """Write ``out/catalog.parquet`` and ``out/queries.parquet``; return counts."""
    if not source.exists():
        raise SystemExit(f"generate_catalog.py: error: the Home Depot catalog {source} is absent; pass --source "
                         "PATH (a Parquet file with title and brand columns)")
    templates = Templates(source)
    out.mkdir(parents=True, exist_ok=True)
    query_rows = np.sort(np.random.default_rng([seed, 1]).choice(products, size=min(queries, products), replace=False))
    schema = pa.schema([("product_id", pa.int64()), ("title", pa.string()), ("brand", pa.string())])
    query_texts: list[str] = []
    tmp = out / ".catalog.parquet.tmp"
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, products, chunk_rows):
            rng = np.random.default_rng([seed, 0, start])
            n = min(chunk_rows, products - start)
            picks = rng.integers(len(templates), size=n)
            titles, heads = zip(*(templates.title(rng, int(t), swap) for t in picks))
            for row in query_rows[(query_rows >= start) & (query_rows < start + n)]:
                query_texts.append(query_for(rng, titles[row - start], heads[row - start]))
            writer.write_table(pa.table({
                "product_id": pa.array(np.arange(start + 1, start + n + 1), pa.int64()),
                "title": pa.array(titles, pa.string()),
                "brand": pa.array([templates.brands[t] for t in picks], pa.string()),
            }, schema=schema))
    tmp.replace(out / "catalog.parquet")
    pq.write_table(pa.table({"query_id": pa.array(np.arange(1, len(query_texts) + 1), pa.int64()),
                             "query": pa.array(query_texts, pa.string())}), out / "queries.parquet")
    return {"products": products, "queries": len(query_texts), "templates": len(templates)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"default {DEFAULT_SOURCE}")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--swap", type=float, default=0.6, help="probability that a swappable word is swapped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    if args.products < 1:
        parser.error("--products must be >= 1")
    counts = generate(args.products, args.out, source=args.source, queries=args.queries, swap=args.swap,
                      seed=args.seed, chunk_rows=args.chunk_rows)
    print(f"{counts['products']} products, {counts['queries']} queries from {counts['templates']} templates "
          f"in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
