"""Synthetic shop logs and catalogs of a chosen size, for the scale benchmark (issue 20).

    python benchmarks/scale/generate.py --users 200000 --items 60000 --out /tmp/scale-200k

writes ``OUT/logs.parquet`` (``user_id``, ``items``: item ids oldest first, the ``[data] logs``
format), ``OUT/users.parquet`` (``query_id``, ``history``: every user with the whole sequence,
the ``funnel run`` queries) and ``OUT/items.parquet`` (``item_id``, ``title``, ``category``).
Item popularity follows a Zipf law (exponent ``--zipf``); each user has ``--min-len`` to
``--max-len`` items; each next item is near the previous one in id order (a step of a few
places either way), or with probability ``--jump`` a fresh popular draw, so that item-to-item
association has something to find. Everything follows from ``--seed``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def zipf_draws(rng: np.random.Generator, n_items: int, size: int, exponent: float) -> np.ndarray:
    """``size`` item positions drawn with probability proportional to ``1 / rank**exponent``."""
    weights = 1.0 / np.arange(1, n_items + 1) ** exponent
    cdf = np.cumsum(weights / weights.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(size)), n_items - 1)


def _strings(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """``prefix`` + zero-padded ``numbers`` as one Arrow string array."""
    out = pa.array(np.char.add(prefix, np.char.zfill(numbers.astype(str), width)), pa.string())
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def generate(users: int, items: int, *, min_len: int = 5, max_len: int = 20, zipf: float = 1.05,
             jump: float = 0.3, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """``(logs, catalog)`` tables; see the module docstring."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, users)
    total = int(lengths.sum())
    popular = rng.permutation(items)  # popularity rank -> item position, so popular items are spread out
    fresh = popular[zipf_draws(rng, items, total, zipf)]
    step = rng.integers(1, 6, total) * rng.choice([-1, 1], total)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    restart = rng.random(total) < jump
    restart[starts] = True
    # position = last restart's item + the sum of the steps since it (a random walk per segment)
    seg = np.cumsum(restart) - 1
    walk = np.cumsum(np.where(restart, 0, step))
    base = walk[np.flatnonzero(restart)][seg]
    pos = (fresh[np.flatnonzero(restart)][seg] + walk - base) % items
    item_ids = _strings("i", pos, 7)
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    user_ids = _strings("u", np.arange(users), 8)
    logs = pa.table({"user_id": user_ids, "items": pa.ListArray.from_arrays(offsets, item_ids)})
    ids = np.char.add("i", np.char.zfill(np.arange(items).astype(str), 7))
    category = rng.integers(0, 200, items)
    catalog = pa.table({"item_id": pa.array(ids), "title": pa.array([f"product {i} of category {c}" for i, c in
                                                                     zip(range(items), category)]),
                        "category": pa.array(np.char.add("c", category.astype(str)))})
    return logs, catalog


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-len", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--zipf", type=float, default=1.05)
    parser.add_argument("--jump", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logs, catalog = generate(args.users, args.items, min_len=args.min_len, max_len=args.max_len, zipf=args.zipf,
                             jump=args.jump, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    pq.write_table(logs, args.out / "logs.parquet", row_group_size=50_000)
    pq.write_table(pa.table({"query_id": logs.column("user_id"), "history": logs.column("items")}),
                   args.out / "users.parquet", row_group_size=50_000)
    pq.write_table(catalog, args.out / "items.parquet")
    n = int(pc.sum(pc.list_value_length(logs.column("items"))).as_py())
    print(f"{args.users} users, {args.items} items, {n} interactions in {args.out}")


if __name__ == "__main__":
    main()
