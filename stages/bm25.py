"""Lexical recall: BM25 over catalog text, on the ``bm25s`` library."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.artifacts import MANIFEST, build_key, read_artifact, read_manifest, sha256_file, write_json_atomic
from pipeline.build import BuildContext
from pipeline.columns import ITEM_ID, QUERY, QUERY_ID, RANK, SCORE, SOURCE
from pipeline.data import read_catalog
from pipeline.errors import ArtifactError, ConfigError, DataError
from pipeline.schema import ANY
from pipeline.stage import Pipeline, Stage, StageTags

__all__ = ["BM25Recall", "LexicalTokenizer", "UNITS", "TOKENIZER_VERSION"]

#: Bumped whenever :class:`LexicalTokenizer` changes what it emits (old indexes then rebuild).
TOKENIZER_VERSION = 1
IDS_FILE = "ids.parquet"
#: Files ``bm25s.BM25.save`` writes (numpy ``.npy`` without pickle, and JSON).
BM25S_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy", "vocab.index.json",
               "params.index.json")
METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")

#: Unit spellings mapped to one form, so "60-watt", "60 watts" and "60w" share the tokens "60" and "w".
UNITS = {
    **dict.fromkeys(("in", "inch", "inches"), "in"),
    **dict.fromkeys(("ft", "foot", "feet"), "ft"),
    **dict.fromkeys(("lb", "lbs", "pound", "pounds"), "lb"),
    **dict.fromkeys(("gal", "gallon", "gallons"), "gal"),
    **dict.fromkeys(("w", "watt", "watts"), "w"),
    **dict.fromkeys(("v", "volt", "volts"), "v"),
    **dict.fromkeys(("amp", "amps", "ampere", "amperes"), "amp"),
    **dict.fromkeys(("oz", "ounce", "ounces"), "oz"),
    **dict.fromkeys(("qt", "quart", "quarts"), "qt"),
    **dict.fromkeys(("mm", "millimeter", "millimeters"), "mm"),
    **dict.fromkeys(("cm", "centimeter", "centimeters"), "cm"),
    **dict.fromkeys(("yd", "yard", "yards"), "yd"),
    **dict.fromkeys(("sq", "square"), "sq"),
    **dict.fromkeys(("cu", "cubic"), "cu"),
    **dict.fromkeys(("ga", "gauge"), "gauge"),
}

_INCH_MARK = re.compile(r"(\d)\s*(?:\"|''|”|″)")
_FOOT_MARK = re.compile(r"(\d)\s*(?:'|’|′)")
_COMPOUND = re.compile(r"[a-z0-9]+(?:[./\-][a-z0-9]+)*")
_PIECE = re.compile(r"[a-z]+|[0-9]+(?:[./][0-9]+)*")
_ALPHA = re.compile(r"[a-z]+")


@dataclass
class LexicalTokenizer:
    """Product-search tokenisation that keeps model numbers and sizes.

    Text is lower-cased; ``5"`` becomes ``5 in`` and ``8'`` becomes ``8 ft``. Then each
    *compound* — letters and digits joined by ``.``, ``/`` or ``-`` (``3/4``, ``1-1/2``,
    ``60-watt``, ``x200``, ``dw0100``, ``2x4``, ``1.9``) — is emitted whole, followed by its
    parts: the pieces between hyphens, and the letter and number runs of mixed tokens
    (``60w`` → ``60``, ``w``; ``2x4`` → ``2``, ``x``, ``4``). Fractions and decimals stay
    whole. So an exact model number or size matches as one rare token, and a differently
    written one (``60 watt`` vs ``60-Watt``) still matches on its parts. Unit words map to one
    spelling (:data:`UNITS`), alphabetic tokens are stemmed (Snowball, via PyStemmer) when
    ``stemmer`` names a language, and ``stopwords`` are dropped (never numbers or units).
    """

    stemmer: str | None = "english"
    stopwords: frozenset[str] = frozenset()
    _stem: Any = field(default=None, init=False, repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stemmer:
            try:
                import Stemmer
            except ImportError as exc:  # pragma: no cover - PyStemmer is a dependency
                raise ConfigError("stemming needs PyStemmer: pip install PyStemmer (or set stemmer = \"\")") from exc
            try:
                self._stem = Stemmer.Stemmer(self.stemmer)
            except KeyError as exc:
                raise ConfigError(f"PyStemmer has no stemmer for {self.stemmer!r}; it has {Stemmer.algorithms()}") from exc

    def _word(self, token: str) -> str | None:
        if token in UNITS:
            return UNITS[token]
        if token in self.stopwords:
            return None
        if self._stem is not None and _ALPHA.fullmatch(token):
            word = self._cache.get(token)
            if word is None:
                word = self._cache[token] = self._stem.stemWord(token)
            return word
        return token

    def __call__(self, text: str | None) -> list[str]:
        if not text:
            return []
        text = _FOOT_MARK.sub(r"\1 ft ", _INCH_MARK.sub(r"\1 in ", text.lower()))
        out: list[str] = []
        for compound in _COMPOUND.findall(text):
            parts = compound.split("-") if "-" in compound else []
            pieces = [compound, *parts]
            for part in parts or [compound]:
                runs = _PIECE.findall(part)
                if len(runs) > 1 and _ALPHA.search(part):
                    pieces += runs
            for piece in pieces:
                word = self._word(piece)
                if word:
                    out.append(word)
        return out

    def spec(self) -> dict[str, Any]:
        """What an index records about the tokeniser it was built with."""
        return {"version": TOKENIZER_VERSION, "stemmer": self.stemmer or None, "stopwords": sorted(self.stopwords)}


def _stopwords(value: str | list[str] | tuple[str, ...] | None) -> frozenset[str]:
    if not value:
        return frozenset()
    if value == "en":
        from bm25s.stopwords import STOPWORDS_EN

        return frozenset(STOPWORDS_EN) - set(UNITS)
    return frozenset(w.lower() for w in value)


class BM25Recall(Stage):
    """Recall the ``k`` best items of each query by BM25 over catalog text.

    ``funnel build`` indexes, for every catalog item, the text of the ``item_text`` columns
    (title, brand, ...; list columns such as colours or materials are joined), tokenised by
    :class:`LexicalTokenizer` (model numbers and sizes kept, units normalised, optional Snowball
    stemming and stop words). The index is ``bm25s``' own format — sparse score matrix as numpy
    ``.npy`` (saved and loaded with ``allow_pickle=False``) and the vocabulary as JSON — plus the
    item ids (``ids.parquet``) and a ``manifest.json`` with the SHA-256 of every file, written
    last. A run checks the checksums and that the index was built with the same tokeniser.

    Input: one row per query with its text (``query_column``). Output, like ``recall.faiss``:
    long form, one row per (query, hit), ordered by query then rank, with the query's columns,
    ``item_id``, ``score`` (the BM25 score), ``rank`` (1-based) and ``source``. Only items that
    share at least one token with the query are returned, so a query of rare or misspelt words
    gets fewer than ``k`` hits, and one with no known token gets none (its query row then does
    not appear in the output). Ties are broken by catalog order, so results are deterministic.
    A null or blank query text is an invalid row (quarantined by ``funnel run``; an error with
    ``--strict``).

    Args:
        index: folder of the index, relative to the config file's folder.
        k: hits per query (at most).
        query_column: column holding the query text.
        item_text: catalog columns whose text is indexed.
        stemmer: Snowball language for PyStemmer (``"english"``), or ``""``/``None`` for none.
        stopwords: ``"en"`` (bm25s' English list, unit words kept), a list of words, or ``[]``.
        k1, b: BM25 term-frequency saturation and length normalisation.
        method: BM25 variant, one of :data:`METHODS` (bm25s' names).
        source: value of the ``source`` column.
    """

    name = "recall.bm25"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(QUERY, pa.string())])
    output_schema = pa.schema(
        [pa.field(ITEM_ID, ANY), pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32()), pa.field(SOURCE, pa.string())]
    )
    tags = StageTags(devices=("cpu",), requires_build=True, level="query")
    path_params = ("index",)

    def __init__(
        self,
        index: str = "artifacts/bm25",
        k: int = 100,
        query_column: str = QUERY,
        item_text: list[str] | tuple[str, ...] = ("title", "brand"),
        stemmer: str | None = "english",
        stopwords: str | list[str] | tuple[str, ...] | None = "en",
        k1: float = 1.2,
        b: float = 0.75,
        method: str = "lucene",
        source: str = "bm25",
    ):
        self.index = index
        self.k = k
        self.query_column = query_column
        self.item_text = item_text
        self.stemmer = stemmer
        self.stopwords = stopwords
        self.k1 = k1
        self.b = b
        self.method = method
        self.source = source

    # -- parameters and schema ---------------------------------------------------------------

    def validate_params(self) -> None:
        super().validate_params()
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise self._bad_param("k", "an int >= 1")
        if not self.item_text or not all(isinstance(c, str) for c in self.item_text):
            raise self._bad_param("item_text", "a non-empty list of catalog column names")
        if self.stemmer is not None and not isinstance(self.stemmer, str):
            raise self._bad_param("stemmer", "a Snowball language name such as 'english', or '' for none")
        sw = self.stopwords
        if not (sw is None or sw == "en" or (isinstance(sw, (list, tuple)) and all(isinstance(w, str) for w in sw))):
            raise self._bad_param("stopwords", "'en', a list of words, or []")
        if not isinstance(self.k1, (int, float)) or isinstance(self.k1, bool) or self.k1 < 0:
            raise self._bad_param("k1", "a number >= 0")
        if not isinstance(self.b, (int, float)) or isinstance(self.b, bool) or not 0 <= self.b <= 1:
            raise self._bad_param("b", "a number in [0, 1]")
        if self.method not in METHODS:
            raise self._bad_param("method", f"one of {METHODS}")
        if not isinstance(self.source, str) or not self.source:
            raise self._bad_param("source", "a non-empty string")

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(self.query_column, pa.string())])

    def tokenizer(self) -> LexicalTokenizer:
        return LexicalTokenizer(stemmer=self.stemmer or None, stopwords=_stopwords(self.stopwords))

    def _index_spec(self, tokenizer: LexicalTokenizer) -> dict[str, Any]:
        return {"tokenizer": tokenizer.spec(), "item_text": list(self.item_text), "k1": float(self.k1),
                "b": float(self.b), "method": self.method}

    # -- build -------------------------------------------------------------------------------

    def build(self, upstream: Pipeline | None, ctx: BuildContext) -> str:
        """Index ``item_text`` of the ``[data] catalog``; skipped when catalog and settings are unchanged."""
        import bm25s
        from tqdm.auto import tqdm

        from .faiss import _item_texts

        self.validate_params()
        folder = self.resolve_path(self.index)
        catalog_path = ctx.data_path("catalog")
        tokenizer = self.tokenizer()
        spec = self._index_spec(tokenizer)
        key = build_key(stage=self.name, **spec, catalog=sha256_file(catalog_path))
        if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what="bm25 index").get("build_key") == key:
            return f"{self.name}: up to date ({folder})"
        catalog = read_catalog(catalog_path, list(self.item_text))
        texts = _item_texts(catalog, self.item_text)
        corpus = [tokenizer(t) for t in tqdm(texts, desc="bm25 tokenising", unit="item", disable=not ctx.progress)]
        retriever = bm25s.BM25(k1=float(self.k1), b=float(self.b), method=self.method)
        retriever.index(corpus, show_progress=ctx.progress)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        retriever.save(str(folder), allow_pickle=False, show_progress=False)
        pq.write_table(pa.table({ITEM_ID: catalog.column(ITEM_ID)}), folder / IDS_FILE)
        files = [*BM25S_FILES, IDS_FILE]
        if (folder / "nonoccurrence_array.index.npy").exists() and self.method in ("bm25l", "bm25+"):
            files.append("nonoccurrence_array.index.npy")
        empty = sum(1 for toks in corpus if not toks)
        write_json_atomic(folder / MANIFEST, {
            "kind": "bm25", "build_key": key, **spec, "count": catalog.num_rows, "vocabulary": len(retriever.vocab_dict),
            "empty_items": empty, "source": str(catalog_path), "library": f"bm25s {bm25s.__version__}",
            "files": {name: sha256_file(folder / name) for name in files},
        })
        return (f"{self.name}: indexed {catalog.num_rows} items ({len(retriever.vocab_dict)} terms"
                f"{f', {empty} items without text' if empty else ''}) in {folder}")

    # -- run ---------------------------------------------------------------------------------

    def warm_up(self) -> None:
        if getattr(self, "retriever_", None) is not None:
            return
        self.validate_params()
        super().warm_up()
        try:
            import bm25s

            folder = self.resolve_path(self.index)
            what = f"stage '{self.name}' index"
            tokenizer = self.tokenizer()
            want = self._index_spec(tokenizer)
            read_artifact(folder, what=what, kind="bm25", expect={name: want[name] for name in ("tokenizer", "item_text")})
            retriever = bm25s.BM25.load(str(folder), load_corpus=False, mmap=False, allow_pickle=False)
            ids = pq.read_table(folder / IDS_FILE).column(ITEM_ID).combine_chunks()
            if len(ids) != retriever.scores["num_docs"]:
                raise ArtifactError(f"{what}: {folder} has {retriever.scores['num_docs']} documents but {len(ids)} ids")
        except BaseException:
            self.device_ = None
            raise
        self.tokenizer_ = tokenizer
        self.ids_ = ids
        self.retriever_ = retriever

    def invalid_rows(self, table: pa.Table) -> pa.Array | None:
        text = table.column(self.query_column)
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), ""), True)
        if not pc.any(blank).as_py():
            return None
        return pc.if_else(blank, pa.scalar(f"'{self.query_column}' is null or empty"), pa.scalar(None, pa.string()))

    def search(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Positions and scores of the best (up to ``k``) items for one query text."""
        retriever = self.retriever_
        vocab = retriever.vocab_dict
        ids = sorted({vocab[t] for t in self.tokenizer_(text) if t in vocab})
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        indptr, indices = retriever.scores["indptr"], retriever.scores["indices"]
        matched = np.zeros(retriever.scores["num_docs"], dtype=bool)
        for t in ids:
            matched[indices[indptr[t]:indptr[t + 1]]] = True
        hits = np.flatnonzero(matched)
        scores = retriever.get_scores_from_ids(ids)
        if len(hits) > self.k:
            kth = np.partition(scores[hits], len(hits) - self.k)[len(hits) - self.k]
            hits = hits[scores[hits] >= kth]
        order = np.lexsort((hits, -scores[hits]))[: self.k]
        return hits[order], scores[hits[order]].astype(np.float32)

    def transform(self, table: pa.Table) -> pa.Table:
        reasons = self.invalid_rows(table)
        if reasons is not None:
            row = int(np.argmax(pc.is_valid(reasons).to_numpy(zero_copy_only=False)))
            raise DataError(f"stage '{self.name}': column '{self.query_column}' is null or empty for query "
                            f"{table.column(QUERY_ID)[row].as_py()!r}")
        rows, positions, scores, ranks = [], [], [], []
        for i, text in enumerate(table.column(self.query_column).to_pylist()):
            pos, sc = self.search(text)
            rows.append(np.full(len(pos), i, np.int64))
            positions.append(pos)
            scores.append(sc)
            ranks.append(np.arange(1, len(pos) + 1, dtype=np.int32))
        cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))
        rows, positions = cat(rows, np.int64), cat(positions, np.int64)
        kept = [c for c in table.column_names if c not in {ITEM_ID, SCORE, RANK, SOURCE}]
        out = table.select(kept).take(pa.array(rows, pa.int64()))
        return (
            out.append_column(ITEM_ID, self.ids_.take(pa.array(positions, pa.int64())))
            .append_column(pa.field(SCORE, pa.float32()), pa.array(cat(scores, np.float32), pa.float32()))
            .append_column(pa.field(RANK, pa.int32()), pa.array(cat(ranks, np.int32), pa.int32()))
            .append_column(pa.field(SOURCE, pa.string()), pa.repeat(pa.scalar(self.source, pa.string()), len(rows)))
        )
