"""A learned sequence model over users' histories (SASRec), as a recall source and as ranking features.

``recall.sequence`` and ``features.sequence`` share one artifact: a causal self-attention
transformer over the item ids of a user's history (Kang & McAuley, "Self-Attentive Sequential
Recommendation", 2018), trained by ``funnel build`` on ``[data] logs`` to predict each next
item. Item vectors are a learned embedding *plus* a learned projection of the items' title
embeddings (the ``recall.user_vector`` FAISS folder), so an item seen a handful of times in the
logs starts where its title puts it instead of at random. Saved as ``model.safetensors``, the
item order as ``items.parquet`` and a ``manifest.json`` with checksums and the build key; no
pickle anywhere. torch is imported when a model is trained or loaded, never at import.

No peeking: the ranker's next-item training view (:func:`stages.history.next_item_training`)
re-roots every upstream artifact folder and rebuilds it from the logs without each user's last
item, so the model that scores the ranker's training candidates never saw their targets; the
serving model is trained on all the logs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.artifacts import MANIFEST, build_key, read_manifest, sha256_file, verify_files, write_json_atomic
from pipeline.build import BuildContext, check_fits
from pipeline.columns import HISTORY, ITEM_ID, QUERY_ID, RANK, SCORE, SOURCE
from pipeline.errors import ArtifactError, DataError
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Pipeline, Stage, StageTags

from .association import _is_int, _is_number, candidates_table, encode_sorted, lookup_positions, split_histories
from .features import feature_column

__all__ = ["SequenceRecall", "SequenceFeatures", "SequenceModel", "train_sequence_model", "SEQUENCE_FEATURES",
           "MODEL_FILE", "ITEMS_FILE"]

MODEL_FILE = "model.safetensors"
ITEMS_FILE = "items.parquet"
KIND = "sequence-model"
WHAT = "sequence model"
#: features.sequence columns: ``f_<prefix>_<name>``
SEQUENCE_FEATURES = {
    "score": "the model's next-item score of the candidate (dot product of user and item vectors)",
    "rank": "the candidate's rank among all catalogue items not in the history by that score (1 = best)",
    "logp": "log-probability of the candidate under the model's softmax over all items",
}
#: the training parameters (shared by both stages; the build key is made of them)
TRAIN_PARAMS = ("dim", "layers", "heads", "max_len", "dropout", "epochs", "batch_size", "lr", "negatives",
                "patience", "valid_users", "seed", "max_train_users")
#: most scores held at once when users are scored against every item (floats, 64 MB): the
#: (users x items) matrix is computed in blocks of columns at most this large, so a catalogue of
#: millions of items is scored in bounded memory (a catalogue that fits in one block, as Beauty's
#: 12,101 items for 512 users do, is scored in one matrix product)
SCORE_BLOCK = 1 << 24
#: bytes per training user beyond its padded input and target rows (its array and list entry)
BYTES_PER_USER = 160
#: from this many items on, the item table learns with sparse gradients (``SparseAdam`` on the
#: rows a batch touches) when negatives are sampled: dense Adam updates every row at every step,
#: 719 ms per step at 1,000,000 items against 106 sparse, while at Beauty's 12,101 items dense is
#: the faster (88 against 103 ms; 2 cores, batches of 256 users x 19 positions, 1,024 negatives)
SPARSE_ITEMS = 50_000


def _sasrec_class():
    import torch
    from torch import nn

    class SASRec(nn.Module):
        """Item + position embeddings, ``layers`` pre-norm causal self-attention blocks, a final
        LayerNorm; the output at a position is the user vector that scores the next item against
        the (tied) item vectors. Row 0 of the item table is padding."""

        def __init__(self, n_items: int, dim: int, max_len: int, layers: int, heads: int, dropout: float,
                     content_dim: int):
            super().__init__()
            self.dim, self.heads = dim, heads
            self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
            nn.init.normal_(self.item.weight, std=0.02 if content_dim else 1 / math.sqrt(dim))
            with torch.no_grad():
                self.item.weight[0].zero_()
            self.content = nn.Linear(content_dim, dim, bias=False) if content_dim else None
            self.register_buffer("content_vectors", torch.zeros(n_items + 1, content_dim) if content_dim else None)
            self.pos = nn.Embedding(max_len, dim)
            nn.init.normal_(self.pos.weight, std=0.02)
            self.drop = nn.Dropout(dropout)
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True,
                                               norm_first=True, activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)

        def item_vectors(self, rows: "torch.Tensor | None" = None) -> "torch.Tensor":
            """Vectors of item ``rows`` (any shape), or of every row; projecting only the rows a
            training batch needs keeps the content projection cheap."""
            if rows is None:
                vectors = self.item.weight
                return vectors + self.content(self.content_vectors) if self.content is not None else vectors
            vectors = self.item(rows)
            return vectors + self.content(self.content_vectors[rows]) if self.content is not None else vectors

        def forward(self, seqs: "torch.Tensor", vectors: "torch.Tensor | None" = None) -> "torch.Tensor":
            """``seqs`` (batch, len) item rows, left-padded with 0 -> (batch, len, dim) user vectors."""
            b, n = seqs.shape
            pad = seqs == 0
            x = self.item_vectors(seqs) if vectors is None else vectors[seqs]
            x = x * (~pad).unsqueeze(-1) + self.pos.weight[-n:].unsqueeze(0)
            # causal, and no attending to padding -- except a position to itself, so no row is all -inf
            eye = torch.eye(n, dtype=torch.bool, device=seqs.device)
            blocked = torch.triu(torch.ones(n, n, dtype=torch.bool, device=seqs.device), 1)
            blocked = (blocked.unsqueeze(0) | pad.unsqueeze(1)) & ~eye
            mask = blocked.repeat_interleave(self.heads, dim=0)
            return self.norm(self.encoder(self.drop(x), mask=mask))

    return SASRec


def _padded(histories: list[np.ndarray], max_len: int) -> np.ndarray:
    """Histories of item rows (1-based, 0 = padding) as a left-padded (n, width) int64 matrix."""
    width = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    out = np.zeros((len(histories), width), np.int64)
    for i, h in enumerate(histories):
        h = h[-width:]
        if len(h):
            out[i, width - len(h):] = h
    return out


def _score_blocks(user_vecs, vectors, histories: list[np.ndarray]):
    """``(first column, block)`` over column blocks of ``user_vecs @ vectors.T`` (at most
    :data:`SCORE_BLOCK` scores each); column 0 (padding) and each user's own history rows are
    ``-inf``. Histories hold 1-based rows, no zeros."""
    import torch

    n_users, n_cols = user_vecs.shape[0], vectors.shape[0]
    width = max(1, SCORE_BLOCK // max(n_users, 1))
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories).astype(np.int64) if len(rows) else np.zeros(0, np.int64)
    for lo in range(0, n_cols, width):
        hi = min(lo + width, n_cols)
        block = user_vecs @ vectors[lo:hi].T
        if lo == 0:
            block[:, 0] = -torch.inf
        inside = (cols >= lo) & (cols < hi)
        if inside.any():
            block[torch.as_tensor(rows[inside], device=block.device),
                  torch.as_tensor(cols[inside] - lo, device=block.device)] = -torch.inf
        yield lo, block


def _top_k(user_vecs, vectors, histories: list[np.ndarray], k: int):
    """Each user's ``k`` best ``(scores, 1-based item rows)``, best first, merged block by block
    (one ``torch.topk`` when the catalogue fits in one block)."""
    import torch

    best = rows = None
    for lo, block in _score_blocks(user_vecs, vectors, histories):
        vals, cols = torch.topk(block, min(k, block.shape[1]), dim=1)
        cols = cols + lo
        if best is not None:
            vals, cols = torch.cat([best, vals], dim=1), torch.cat([rows, cols], dim=1)
            vals, pick = torch.topk(vals, min(k, vals.shape[1]), dim=1)
            cols = torch.gather(cols, 1, pick)
        best, rows = vals, cols
    return best, rows


def train_sequence_model(sequences: list[np.ndarray], n_items: int, content: np.ndarray | None, *, dim: int = 64,
                         layers: int = 2, heads: int = 2, max_len: int = 50, dropout: float = 0.2, epochs: int = 30,
                         batch_size: int = 256, lr: float = 2e-3, negatives: int = 1024, patience: int = 3,
                         valid_users: int = 1000, seed: int = 0, device: str = "cpu", progress: bool = True,
                         desc: str = "sequence model"):
    """Train a SASRec model on ``sequences`` (arrays of 1-based item rows, oldest first).

    Every position predicts the item after it. The loss is softmax cross-entropy against the
    true next item and ``negatives`` items drawn uniformly per batch (shared by the batch;
    ``0`` = the full softmax over every item). A seeded sample of up to ``valid_users`` users
    keeps its last item out of training; Recall@10 of that item (full ranking, history
    excluded) is measured after each epoch and training stops after ``patience`` epochs
    without a gain, keeping the best epoch's weights. From :data:`SPARSE_ITEMS` items on (with
    sampled negatives) the item table trains with sparse gradients, so a step costs what the
    batch touches rather than the whole catalogue. Returns ``(model, info)``.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    seqs = [s for s in sequences if len(s) >= 2]
    if not seqs:
        raise DataError(f"{WHAT}: no user in the logs has two items or more; nothing to learn the next item from")
    n_valid = min(valid_users, len(seqs) // 10)
    valid_idx = set(rng.choice(len(seqs), n_valid, replace=False).tolist()) if n_valid else set()
    train_seqs = [s[:-1] if i in valid_idx else s for i, s in enumerate(seqs)]
    train_seqs = [s for s in train_seqs if len(s) >= 2]
    valid_hist = [seqs[i][:-1] for i in sorted(valid_idx)]
    valid_target = np.array([seqs[i][-1] for i in sorted(valid_idx)], np.int64)

    # inputs: the last max_len items before each target; targets: the items after them
    inputs = _padded([s[:-1] for s in train_seqs], max_len)
    targets = _padded([s[1:] for s in train_seqs], max_len)
    model = _sasrec_class()(n_items, dim, inputs.shape[1], layers, heads, dropout,
                            0 if content is None else content.shape[1]).to(device)
    if content is not None:
        with torch.no_grad():
            model.content_vectors[1:] = torch.as_tensor(content, dtype=torch.float32)
    sparse = bool(negatives) and negatives < n_items and n_items >= SPARSE_ITEMS
    if sparse:
        model.item.sparse = True
        rest = [p for name, p in model.named_parameters() if name != "item.weight"]
        opts = [torch.optim.SparseAdam([model.item.weight], lr=lr, betas=(0.9, 0.98)),
                torch.optim.Adam(rest, lr=lr, betas=(0.9, 0.98))]
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))]
    inputs_t, targets_t = torch.as_tensor(inputs), torch.as_tensor(targets)
    lengths = np.minimum([len(s) - 1 for s in train_seqs], inputs.shape[1])
    gen = torch.Generator().manual_seed(seed)

    def batches() -> list[np.ndarray]:
        """Users of similar history lengths together (each batch is cut to its longest history), in random order."""
        order = np.lexsort((rng.random(len(lengths)), lengths))
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        return [chunks[i] for i in rng.permutation(len(chunks))]

    def valid_recall() -> float:
        if not len(valid_target):
            return float("nan")
        model.eval()
        hits = 0
        with torch.no_grad():
            vectors = model.item_vectors()
            for start in range(0, len(valid_hist), 1024):
                hist = valid_hist[start:start + 1024]
                user_vecs = _user_vectors(model, hist, model.pos.num_embeddings, device, vectors)
                top = _top_k(user_vecs, vectors, hist, 10)[1].cpu().numpy()
                hits += int((top == valid_target[start:start + len(hist), None]).any(axis=1).sum())
        return hits / len(valid_target)

    best, best_epoch, best_state, history, waited = -1.0, 0, None, [], 0
    t0 = time.perf_counter()
    # one step per batch, so that logs of millions of users show progress within an epoch
    steps = -(-len(train_seqs) // batch_size)
    bar = tqdm(total=epochs * steps, desc=desc, unit="batch", disable=not progress)
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        bar.set_postfix(epoch=epoch, **({"valid_r10": f"{history[-1]['valid_recall@10']:.4f}"} if history else {}))
        for idx in batches():
            width = int(lengths[idx].max())
            idx = torch.as_tensor(idx)
            x, y = inputs_t[idx, -width:].to(device), targets_t[idx, -width:].to(device)
            keep = y > 0
            hidden = model(x)[keep]
            y = y[keep]
            if negatives and negatives < n_items:
                neg = torch.randint(1, n_items + 1, (negatives,), generator=gen).to(device)
                pos_logit = (hidden * model.item_vectors(y)).sum(-1, keepdim=True)
                neg_logit = hidden @ model.item_vectors(neg).T
                neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == y.unsqueeze(1), -torch.inf)
                logits = torch.cat([pos_logit, neg_logit], dim=1)
                loss = F.cross_entropy(logits, torch.zeros(len(y), dtype=torch.long, device=device))
            else:
                logits = hidden @ model.item_vectors()[1:].T
                loss = F.cross_entropy(logits, y - 1)
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
            with torch.no_grad():
                model.item.weight[0].zero_()
            total, count = total + float(loss.detach()) * len(y), count + len(y)
            bar.update()
        recall = valid_recall()
        history.append({"epoch": epoch, "loss": round(total / max(count, 1), 4), "valid_recall@10": round(recall, 4)})
        if not recall <= best:  # NaN (no validation users): always keep the latest
            best, best_epoch, waited = recall, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    bar.close()
    model.item.sparse = False
    model.load_state_dict(best_state)
    model.eval()
    info = {"epochs_run": len(history), "best_epoch": best_epoch, "valid_recall@10": None if math.isnan(best) else best,
            "valid_users": len(valid_target), "train_users": len(train_seqs), "sparse_item_gradients": sparse, "seconds": round(time.perf_counter() - t0, 1),
            "history": history}
    return model, info


#: the Args entries of the parameters both stages share, appended to their docstrings
_MODEL_ARGS = """        model: artifact folder of the model, relative to the config file's folder.
        content: FAISS index folder of title embeddings (``recall.user_vector``'s) that feed the
            item vectors through a learned projection; ``None`` for id embeddings only (build).
        history_column: list column of item ids, oldest first.
        dim: width of the item vectors and of the transformer (build).
        layers: causal self-attention blocks (build).
        heads: attention heads per block, a divisor of ``dim`` (build).
        max_len: most recent history items the model reads (build).
        dropout: dropout during training (build).
        epochs: most training epochs; early stopping usually ends sooner (build).
        batch_size: users per training batch (build).
        lr: Adam learning rate (build).
        negatives: items sampled per batch for the softmax; 0 = every item (build).
        patience: epochs without a validation gain before training stops (build).
        valid_users: users whose last item is held out for early stopping (build).
        seed: seed of sampling and initialisation (build).
        max_train_users: train on at most this many users, those whose ids hash lowest under
            ``seed`` (``None``: all), so a shop with tens of millions of users builds in bounded
            memory and time; every logged item still gets a vector (build). A build that would not
            fit in memory stops before training and names this parameter.
        num_threads: CPU threads for torch; 0 leaves the default.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (training and scoring).
"""


def _user_vectors(model, histories: list[np.ndarray], max_len: int, device: str, vectors=None):
    """The model's output at the last position of each history (1-based rows; empty -> padding only)."""
    import torch

    x = torch.as_tensor(_padded(histories, max_len), device=device)
    return model(x, vectors)[:, -1]


class SequenceModel:
    """A trained model loaded from its artifact folder, with the item id <-> row lookup."""

    def __init__(self, model, ids: pa.Array, config: dict, device: str):
        import torch

        self.model, self.ids, self.config, self.device = model, ids, config, device
        with torch.no_grad():
            self.vectors = model.item_vectors().detach()

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "SequenceModel":
        from safetensors.torch import load_file

        folder = Path(folder)
        manifest = read_manifest(folder, what=WHAT)
        if manifest.get("kind") != KIND:
            raise ArtifactError(f"{WHAT}: {folder / MANIFEST} describes a {manifest.get('kind')!r} artifact, not {KIND}")
        verify_files(folder, manifest, what=WHAT)
        cfg = manifest["config"]
        ids = pq.read_table(folder / ITEMS_FILE).column(ITEM_ID).combine_chunks()
        model = _sasrec_class()(len(ids), cfg["dim"], cfg["max_len"], cfg["layers"], cfg["heads"], 0.0,
                                cfg["content_dim"])
        try:
            model.load_state_dict(load_file(str(folder / MODEL_FILE)))
        except RuntimeError as exc:
            raise ArtifactError(f"{WHAT}: {folder / MODEL_FILE} does not match its manifest ({exc}); rebuild it with "
                                "`funnel build`") from exc
        return cls(model.to(device).eval(), ids, cfg, device)

    def save(self, folder: str | Path, manifest: dict) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / MODEL_FILE))
        pq.write_table(pa.table({ITEM_ID: self.ids}), folder / ITEMS_FILE)
        files = {name: sha256_file(folder / name) for name in (MODEL_FILE, ITEMS_FILE)}
        write_json_atomic(folder / MANIFEST, {**manifest, "kind": KIND, "config": self.config, "files": files})

    def rows(self, ids) -> np.ndarray:
        """1-based row of each id; 0 for ids the model does not know."""
        return lookup_positions(ids, self.ids) + 1

    def _user_vectors(self, histories: list[np.ndarray]):
        return _user_vectors(self.model, histories, self.config["max_len"], self.device, self.vectors)

    def top_k(self, histories: list[np.ndarray], k: int):
        """Each user's ``k`` best next items as ``(scores, 1-based rows)`` torch tensors on the
        model's device, best first; the user's own history items and row 0 excluded (``-inf``
        where fewer than ``k`` remain). Histories hold 1-based rows; unknown items (0) are
        dropped. Scored block by block (:data:`SCORE_BLOCK`), never the whole users x items matrix."""
        import torch

        hist = [h[h > 0] for h in histories]
        with torch.no_grad():
            return _top_k(self._user_vectors(hist), self.vectors, hist, k)

    def candidate_scores(self, histories: list[np.ndarray], users: np.ndarray, items: np.ndarray):
        """``(score, logp, rank)`` of each candidate (user ``users[i]``, 1-based item row
        ``items[i]``) as float32 arrays: the next-item score, its log-softmax over every item, and
        1 + the number of items scored higher (history items and row 0 count as ``-inf``). Two
        passes over the score blocks (:data:`SCORE_BLOCK`; one when the catalogue fits in a block):
        scores and the softmax's normaliser, then the items above each candidate's score."""
        import torch

        hist = [h[h > 0] for h in histories]
        n = len(users)
        with torch.no_grad():
            user_vecs = self._user_vectors(hist)
            first = next(_score_blocks(user_vecs, self.vectors, hist))
            single = first[1].shape[1] == self.vectors.shape[0]

            def blocks():  # a catalogue in one block is scored once for both passes
                return [first] if single else _score_blocks(user_vecs, self.vectors, hist)

            dev = user_vecs.device
            q, cols = torch.as_tensor(users, device=dev), torch.as_tensor(items, device=dev)
            score = torch.full((n,), float("nan"), device=dev)
            norms = []
            for lo, block in blocks():
                inside = (cols >= lo) & (cols < lo + block.shape[1])
                score[inside] = block[q[inside], cols[inside] - lo]
                norms.append(torch.logsumexp(block, dim=1))
            logp = score - torch.logsumexp(torch.stack(norms, dim=1), dim=1)[q]
            # candidates as a (users x most candidates per user) matrix, +inf padded, for one
            # batched searchsorted per block
            order = np.argsort(users, kind="stable")
            counts = np.bincount(users, minlength=len(hist))
            slot = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
            grid = torch.full((len(hist), max(int(counts.max(initial=0)), 1)), float("inf"), device=dev)
            at_q, at_slot = torch.as_tensor(users[order], device=dev), torch.as_tensor(slot, device=dev)
            grid[at_q, at_slot] = score[torch.as_tensor(order, device=dev)]
            above = torch.zeros_like(grid)
            for lo, block in blocks():
                # NumPy's sort is about 2x torch's on a CPU; torch's on a GPU
                ranked = (torch.sort(block, dim=1).values if block.is_cuda
                          else torch.from_numpy(np.sort(block.numpy(), axis=1)))
                above += block.shape[1] - torch.searchsorted(ranked, grid, right=True)
            rank = torch.empty(n, device=dev)
            rank[torch.as_tensor(order, device=dev)] = above[at_q, at_slot] + 1
        return (score.cpu().numpy().astype(np.float32), logp.cpu().numpy().astype(np.float32),
                rank.cpu().numpy().astype(np.float32))


class _SequenceStage(Stage):
    """What ``recall.sequence`` and ``features.sequence`` share: the model's parameters, its build and loading."""

    abstract = True
    tags = StageTags(devices=("cpu", "cuda"), requires_build=True, level="query")
    path_params = ("model", "content")
    same_results_params = ("num_threads",)

    def _init_model_params(self, model, content, history_column, dim, layers, heads, max_len, dropout, epochs,
                           batch_size, lr, negatives, patience, valid_users, seed, max_train_users, num_threads,
                           device) -> None:
        self.model = model
        self.content = content
        self.history_column = history_column
        self.dim = dim
        self.layers = layers
        self.heads = heads
        self.max_len = max_len
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.negatives = negatives
        self.patience = patience
        self.valid_users = valid_users
        self.seed = seed
        self.max_train_users = max_train_users
        self.num_threads = num_threads
        self.device = device

    def validate_params(self) -> None:
        super().validate_params()
        for p in ("dim", "layers", "heads", "max_len", "epochs", "batch_size", "patience"):
            if not _is_int(getattr(self, p)) or getattr(self, p) < 1:
                raise self._bad_param(p, "an int >= 1")
        for p in ("negatives", "valid_users", "seed", "num_threads"):
            if not _is_int(getattr(self, p)) or getattr(self, p) < 0:
                raise self._bad_param(p, "an int >= 0")
        if self.max_train_users is not None and (not _is_int(self.max_train_users) or self.max_train_users < 1):
            raise self._bad_param("max_train_users", "None (all) or an int >= 1")
        if self.dim % self.heads:
            raise self._bad_param("heads", f"a divisor of dim ({self.dim})")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise self._bad_param("dropout", "a number in [0, 1)")
        if not _is_number(self.lr) or not self.lr > 0:
            raise self._bad_param("lr", "a number > 0")
        if not isinstance(self.model, str) or not self.model:
            raise self._bad_param("model", "an artifact folder")
        if self.content is not None and (not isinstance(self.content, str) or not self.content):
            raise self._bad_param("content", "None or a FAISS index folder of item embeddings (recall.user_vector)")
        if not isinstance(self.history_column, str) or not self.history_column:
            raise self._bad_param("history_column", "a column name")

    def _threads(self):
        from threadpoolctl import threadpool_limits

        return threadpool_limits(self.num_threads or None)

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str:
        """Train on ``[data] logs``; skipped when the logs, the content embeddings and the training
        parameters are unchanged (``recall.sequence`` and ``features.sequence`` with the same
        parameters share one build)."""
        import torch

        from pipeline.data import LOG_ITEMS, LOG_USER, read_logs
        from pipeline.device import resolve_device

        from .lightgbm import sample_queries

        self.validate_params()
        folder = self.resolve_path(self.model)
        logs_path = ctx.data_path("logs")
        content_key = None
        if self.content is not None:
            content_folder = self.resolve_path(self.content)
            content_key = read_manifest(content_folder, what=f"stage '{self.name}': content embeddings ('content')"
                                        ).get("build_key")
        params = {p: getattr(self, p) for p in TRAIN_PARAMS}
        key = build_key(kind=KIND, params=params, logs=sha256_file(logs_path), content=content_key)
        if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what=WHAT).get("build_key") == key:
            return f"{self.name}: up to date ({folder})"
        table = read_logs(logs_path)
        flat = pc.list_flatten(table.column(LOG_ITEMS).combine_chunks())
        if flat.null_count:
            raise DataError(f"stage '{self.name}': the logs {logs_path} hold null item ids")
        vectors = None
        if self.content is not None:
            from .user_vector import ItemVectors

            vectors = ItemVectors.load(content_folder)
            ids, _ = encode_sorted(pa.concat_arrays([vectors.ids.cast(flat.type), flat]) if len(flat) else vectors.ids)
        else:
            ids, _ = encode_sorted(flat)
        # every logged item gets a row; the sequences are those of at most max_train_users users
        logs = sample_queries(table, self.max_train_users, self.seed, column=LOG_USER).column(LOG_ITEMS).combine_chunks()
        logs = logs.drop_null() if logs.null_count else logs
        content_dim = 0 if vectors is None else vectors.vectors.shape[1]
        check_fits(self.name, f"training on {len(logs)} users' histories (max_len {self.max_len}) over {len(ids)} items",
                   len(logs) * (self.max_len * 16 + BYTES_PER_USER) + len(ids) * (self.dim * 16 + content_dim * 8),
                   "max_train_users", self.max_train_users)
        if not self.negatives or self.negatives >= len(ids):  # full softmax: logits and their gradient per batch
            check_fits(self.name, f"a softmax over all {len(ids)} items for {self.batch_size} users x {self.max_len} "
                       "positions", 3 * 4 * self.batch_size * self.max_len * len(ids), "negatives", self.negatives)
        flat = pc.list_flatten(logs)
        rows = lookup_positions(flat, ids) + 1
        lengths = pc.list_value_length(logs).to_numpy(zero_copy_only=False).astype(np.int64)
        sequences = np.split(rows, np.cumsum(lengths)[:-1])
        content = None
        if vectors is not None:
            content = np.zeros((len(ids), content_dim), np.float32)
            where = vectors.rows(ids)
            content[where >= 0] = vectors.vectors[where[where >= 0]]
        device = resolve_device(self.device, stage=self.name, supported=self.tags.devices)
        with self._threads(), torch.random.fork_rng(devices=[]):
            model, info = train_sequence_model(
                sequences, len(ids), content, dim=self.dim, layers=self.layers, heads=self.heads, max_len=self.max_len,
                dropout=self.dropout, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                negatives=self.negatives, patience=self.patience, valid_users=self.valid_users, seed=self.seed,
                device=device, progress=ctx.progress, desc=f"{self.name} {'/'.join(folder.parts[-2:])}")
        config = {"dim": self.dim, "layers": self.layers, "heads": self.heads, "max_len": model.pos.num_embeddings,
                  "content_dim": 0 if content is None else content.shape[1]}
        SequenceModel(model.cpu(), ids, config, "cpu").save(folder, {
            "build_key": key, "params": params, "logs": str(logs_path), "content": self.content,
            "items": len(ids), "device": device, "training": info})
        r10 = info["valid_recall@10"]
        return (f"{self.name}: trained {info['best_epoch']}/{info['epochs_run']} epochs on {info['train_users']} users "
                f"in {info['seconds']} s ({device}), valid Recall@10 {r10 if r10 is None else round(r10, 4)}; "
                f"{len(ids)} items in {folder}")

    def warm_up(self) -> None:
        if getattr(self, "model_", None) is not None:
            return
        self.validate_params()
        super().warm_up()
        try:
            self.model_ = SequenceModel.load(self.resolve_path(self.model), device=self.device_)
        except BaseException:
            self.device_ = None
            raise

    def _histories(self, table: pa.Table) -> list[np.ndarray]:
        return split_histories(table.column(self.history_column), self.model_.rows)


class SequenceRecall(_SequenceStage):
    """Recall the ``k`` items a SASRec model scores highest as the user's next item.

    The user vector is the transformer's output after the last ``max_len`` history items
    (unknown ids skipped); every catalogue item is scored exactly (matrix products on
    ``device`` over blocks of at most :data:`SCORE_BLOCK` scores, so memory does not grow with
    the catalogue), the user's own items excluded. Long form out (``item_id``, ``score``,
    ``rank``, ``source``); a user with no known history item gets no rows.

    ``funnel build`` trains the model on ``[data] logs`` (see :func:`train_sequence_model`)
    into ``model``; ``features.sequence`` with the same parameters reads the same folder.

    Args:
        k: items per user.
        source: value of the ``source`` column.
    """

    name = "recall.sequence"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(HISTORY, pa.list_(ANY))])
    output_schema = pa.schema([pa.field(ITEM_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32()),
                               pa.field(SOURCE, pa.string())])

    def __init__(self, model: str = "artifacts/sequence", k: int = 100, source: str = "sequence",
                 content: str | None = None, history_column: str = HISTORY, dim: int = 64,
                 layers: int = 2, heads: int = 2, max_len: int = 50, dropout: float = 0.2, epochs: int = 30,
                 batch_size: int = 256, lr: float = 0.002, negatives: int = 1024, patience: int = 3,
                 valid_users: int = 1000, seed: int = 0, max_train_users: int | None = 1_000_000,
                 num_threads: int = 0, device: str = "auto"):
        self.k = k
        self.source = source
        self._init_model_params(model, content, history_column, dim, layers, heads, max_len, dropout, epochs,
                                batch_size, lr, negatives, patience, valid_users, seed, max_train_users,
                                num_threads, device)

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(self.history_column, pa.list_(ANY))])

    def validate_params(self) -> None:
        super().validate_params()
        if not _is_int(self.k) or self.k < 1:
            raise self._bad_param("k", "an int >= 1")
        if not isinstance(self.source, str) or not self.source:
            raise self._bad_param("source", "a non-empty string")

    def transform(self, table: pa.Table) -> pa.Table:
        seq: SequenceModel = self.model_
        histories = self._histories(table)
        users = np.array([i for i, h in enumerate(histories) if (h > 0).any()], np.int64)
        if len(users) == 0:
            return candidates_table(table, np.zeros(0, np.int64), seq.ids.slice(0, 0), np.zeros(0, np.float32),
                                    self.source)
        with self._threads():
            top, cols = seq.top_k([histories[u] for u in users], min(self.k, len(seq.ids)))
        top, cols = top.cpu().numpy(), cols.cpu().numpy()
        found = np.isfinite(top)
        qi = np.repeat(np.arange(len(users)), top.shape[1]).reshape(top.shape)[found]
        return candidates_table(table, users[qi], seq.ids.take(pa.array(cols[found] - 1, pa.int64())),
                                top[found].astype(np.float32), self.source)


class SequenceFeatures(_SequenceStage):
    """Add the SASRec model's opinion of every candidate, from any source, as ranking features.

    ``f_<prefix>_score`` (the next-item score), ``f_<prefix>_rank`` (its rank among all items
    not in the history, 1 = the model's first choice) and ``f_<prefix>_logp`` (log-probability
    under the model's softmax, comparable across users); see :data:`SEQUENCE_FEATURES`. NaN for
    candidates the model does not know and for users with no known history item, which LightGBM
    treats as missing. The ranker thus learns when to trust the model and when the co-occurrence
    or content signals know better.

    Takes the model and training parameters of ``recall.sequence`` (see there) and builds the
    same artifact; give both stages the same ``model`` folder and parameters to train it once.

    Args:
        features: names from :data:`SEQUENCE_FEATURES`.
        prefix: feature names are ``f_<prefix>_<name>``.
    """

    name = "features.sequence"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY), pa.field(HISTORY, pa.list_(ANY))])
    tags = StageTags(devices=("cpu", "cuda"), requires_build=True, level="candidate")

    def __init__(self, model: str = "artifacts/sequence", features: list[str] | tuple[str, ...] = tuple(SEQUENCE_FEATURES),
                 prefix: str = "seq", content: str | None = None, history_column: str = HISTORY,
                 dim: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50, dropout: float = 0.2,
                 epochs: int = 30, batch_size: int = 256, lr: float = 0.002, negatives: int = 1024, patience: int = 3,
                 valid_users: int = 1000, seed: int = 0, max_train_users: int | None = 1_000_000,
                 num_threads: int = 0, device: str = "auto"):
        self.features = features
        self.prefix = prefix
        self._init_model_params(model, content, history_column, dim, layers, heads, max_len, dropout, epochs,
                                batch_size, lr, negatives, patience, valid_users, seed, max_train_users,
                                num_threads, device)

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(ITEM_ID, ANY), pa.field(self.history_column, pa.list_(ANY))])

    def produced_columns(self) -> pa.Schema:
        return pa.schema([pa.field(feature_column(f"{self.prefix}_{f}"), pa.float32()) for f in self.features])

    def validate_params(self) -> None:
        super().validate_params()
        if (not isinstance(self.features, (list, tuple)) or not self.features
                or any(f not in SEQUENCE_FEATURES for f in self.features)):
            raise self._bad_param("features", f"a non-empty list drawn from {', '.join(SEQUENCE_FEATURES)}")
        if not isinstance(self.prefix, str) or not self.prefix:
            raise self._bad_param("prefix", "a non-empty string")

    def transform(self, table: pa.Table) -> pa.Table:
        seq: SequenceModel = self.model_
        n = table.num_rows
        out = {f: np.full(n, np.nan, np.float32) for f in SEQUENCE_FEATURES}
        if n:
            qcodes = pc.dictionary_encode(table.column(QUERY_ID).combine_chunks()).indices
            qcodes = qcodes.to_numpy(zero_copy_only=False).astype(np.int64)
            first = np.full(int(qcodes.max()) + 1, -1, np.int64)
            first[qcodes[::-1]] = np.arange(n)[::-1]  # each query's history, read once from its first row
            histories = self._histories(table.take(pa.array(first)))
            known = np.array([(h > 0).any() for h in histories])
            items = seq.rows(table.column(ITEM_ID))
            with self._threads():
                cand, logp, rank = seq.candidate_scores(histories, qcodes, items)
            valid = known[qcodes] & (items > 0) & np.isfinite(cand)
            for name, values in (("score", cand), ("logp", logp), ("rank", rank)):
                out[name] = np.where(valid, values, np.nan).astype(np.float32)
        result = table.drop_columns([c for c in self.produced_columns().names if c in table.column_names])
        for f in self.features:
            result = result.append_column(pa.field(feature_column(f"{self.prefix}_{f}"), pa.float32()),
                                          pa.array(out[f], pa.float32()))
        return keep_input_types(result, table.schema)


SequenceRecall.__doc__ = SequenceRecall.__doc__.rstrip(" ") + _MODEL_ARGS
SequenceFeatures.__doc__ = SequenceFeatures.__doc__.rstrip(" ") + _MODEL_ARGS
