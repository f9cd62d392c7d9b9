"""Query spelling correction against the catalog's own vocabulary, on the ``symspellpy`` library."""

from __future__ import annotations

import re
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.artifacts import MANIFEST, build_key, read_artifact, read_manifest, sha256_file, write_json_atomic
from pipeline.columns import QUERY, QUERY_ID
from pipeline.data import read_catalog
from pipeline.errors import ConfigError
from pipeline.schema import ANY
from pipeline.stage import Stage, StageTags

from .bm25 import UNITS

__all__ = ["SpellingCorrector", "WORDS_FILE"]

WORDS_FILE = "words.parquet"
KIND = "spelling-vocabulary"
#: Bumped whenever the way catalog words are counted changes (old vocabularies then rebuild).
VOCABULARY_VERSION = 1
#: A word: letters only, not glued to digits or other letters ("xtreme9000" and "st4500" are
#: model numbers and are left alone).
_WORD = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]+(?![A-Za-z0-9])")
_LETTERS = re.compile(r"[a-z]+")
#: Corrections remembered per stage instance; the memo is emptied when it reaches this size.
MEMO_SIZE = 500_000


class SpellingCorrector(Stage):
    """Correct misspelt query words to words of the catalog ("celing fan" → "ceiling fan").

    Real shop searches are typed fast: in the Home Depot judgments a fifth of the queries hold a
    word that no product title uses ("chandilier", "compressro", "walloven"), and those queries
    score far below the rest, because BM25 cannot match the word and the encoders see a rare
    token. This stage rewrites the query text before recall, so every later stage (encoders,
    BM25, text features, the ranker) sees the corrected query; the text as typed is kept in
    ``original_column``.

    ``funnel build`` counts, for every word of the catalog's ``item_text`` columns, the number of
    items whose text holds it (``words.parquet`` + manifest in ``vocabulary``; no labels are
    read, so it never sees a judgment). A query word is left as it is when it is known: in the
    vocabulary, a unit spelling (``inches``, ``volts``), or sharing its Snowball stem with a
    catalog word (``shackles`` when titles say ``shackle``). Words shorter than ``min_length``
    letters and letters glued to digits (model numbers) are never touched. Any other word is
    replaced by

    * the catalog word (or unit spelling) with the fewest edits (Damerau–Levenshtein, via
      SymSpell; at most ``max_edit_distance``, one for words of five letters or fewer) of at
      least ``min_length`` letters and ``min_count`` items; among equally close ones, one with
      the word's first letter (typos rarely hit it: ``swith`` → ``switch``, not ``with``), then
      the most frequent; a word whose first letter differs must be one edit away; or
    * two catalog words it is made of, each of at least three letters and ``min_count`` items,
      when ``split_compounds`` (``walloven`` → ``wall oven``, ``inchled`` → ``inch led``): chosen
      over a two-edit correction always, over a one-edit one when the rarer of its two words is
      at least a tenth as frequent.

    A word with no such candidate stays as typed. The lookup dictionary is bounded: the
    ``max_words`` most frequent words of at least ``min_count`` items (SymSpell stores every
    deletion of up to ``max_edit_distance`` letters of each word's first seven; 200,000 words
    took 740 MB and 9 s to load on a 2-core machine, Home Depot's 15,818 words 0.3 s). Lower
    ``max_words`` for a catalog with more words than that; the rarest words go first, and they
    are the least likely corrections.

    CPU only: the work is string lookups (4 ms per batch of 256 queries on Home Depot), nothing
    a GPU would speed up; on a GPU machine the stage runs on the CPU beside the GPU stages.
    """

    name = "query.spelling"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY), pa.field(QUERY, pa.string())])
    #: with the default parameters (``text_column``, ``original_column`` rename them)
    output_schema = pa.schema([pa.field(QUERY, pa.string()), pa.field("query_original", pa.string())])
    tags = StageTags(requires_build=True, level="query")
    path_params = ("vocabulary",)

    def __init__(self, vocabulary: str = "artifacts/spelling", item_text: list[str] | tuple[str, ...] = ("title", "brand"),
                 text_column: str = QUERY, original_column: str | None = "query_original", max_edit_distance: int = 2,
                 min_length: int = 4, min_count: int = 3, split_compounds: bool = True, stemmer: str | None = "english",
                 max_words: int = 200_000):
        self.vocabulary = vocabulary
        self.item_text = item_text
        self.text_column = text_column
        self.original_column = original_column
        self.max_edit_distance = max_edit_distance
        self.min_length = min_length
        self.min_count = min_count
        self.split_compounds = split_compounds
        self.stemmer = stemmer
        self.max_words = max_words

    def required_columns(self) -> pa.Schema:
        return pa.schema([pa.field(QUERY_ID, ANY), pa.field(self.text_column, pa.string())])

    def produced_columns(self) -> pa.Schema:
        fields = [pa.field(self.text_column, pa.string())]
        if self.original_column:
            fields.append(pa.field(self.original_column, pa.string()))
        return pa.schema(fields)

    def validate_params(self) -> None:
        super().validate_params()
        if not self.item_text or not isinstance(self.item_text, (list, tuple)) or not all(isinstance(c, str) for c in self.item_text):
            raise self._bad_param("item_text", "a non-empty list of catalog column names")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise self._bad_param("text_column", "a column name")
        if self.original_column is not None and (not isinstance(self.original_column, str) or self.original_column == self.text_column):
            raise self._bad_param("original_column", f"a column name other than text_column ({self.text_column!r}), or None")
        for param, low, high in (("max_edit_distance", 1, 3), ("min_length", 1, 100), ("min_count", 1, 10**9),
                                 ("max_words", 1, 10**8)):
            value = getattr(self, param)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise self._bad_param(param, f"an int in [{low}, {high}]")
        if not isinstance(self.split_compounds, bool):
            raise self._bad_param("split_compounds", "true or false")
        if self.stemmer is not None and not isinstance(self.stemmer, str):
            raise self._bad_param("stemmer", "a PyStemmer language (\"english\") or None")

    # -- build -------------------------------------------------------------------------------

    def build(self, upstream, ctx: Any) -> str:
        """Count the catalog's words; skipped when the catalog and ``item_text`` are unchanged."""
        from .faiss import _item_texts

        self.validate_params()
        folder = self.resolve_path(self.vocabulary)
        catalog_path = ctx.data_path("catalog")
        key = build_key(stage=self.name, version=VOCABULARY_VERSION, item_text=list(self.item_text),
                        catalog=sha256_file(catalog_path))
        if not ctx.force and (folder / MANIFEST).exists() and read_manifest(folder, what="spelling vocabulary").get("build_key") == key:
            return f"{self.name}: up to date ({folder})"
        texts = pl.Series(_item_texts(read_catalog(catalog_path, list(self.item_text)), self.item_text))
        words = (pl.DataFrame({"text": texts}).with_row_index("item")
                 .select(pl.col("item"), pl.col("text").str.to_lowercase().str.extract_all(_LETTERS.pattern).alias("word"))
                 .explode("word").drop_nulls("word").unique()
                 .group_by("word").len(name="count").sort(["count", "word"], descending=[True, False])
                 .with_columns(pl.col("count").cast(pl.Int64)))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        pq.write_table(words.to_arrow(), folder / WORDS_FILE)
        write_json_atomic(folder / MANIFEST, {
            "kind": KIND, "build_key": key, "version": VOCABULARY_VERSION, "item_text": list(self.item_text),
            "items": len(texts), "words": words.height, "source": str(catalog_path),
            "files": {WORDS_FILE: sha256_file(folder / WORDS_FILE)},
        })
        return f"{self.name}: {words.height} words of {len(texts)} items in {folder}"

    # -- run ---------------------------------------------------------------------------------

    def warm_up(self) -> None:
        if getattr(self, "symspell_", None) is not None:
            return
        self.validate_params()
        super().warm_up()
        try:
            from symspellpy import SymSpell

            folder = self.resolve_path(self.vocabulary)
            read_artifact(folder, what=f"stage '{self.name}' vocabulary", kind=KIND, expect={"item_text": list(self.item_text)})
            words = pl.from_arrow(pq.read_table(folder / WORDS_FILE))
            stem = None
            if self.stemmer:
                import Stemmer

                try:
                    stem = Stemmer.Stemmer(self.stemmer).stemWord
                except KeyError as exc:
                    raise ConfigError(f"stage '{self.name}': PyStemmer has no stemmer for {self.stemmer!r}; "
                                      f"it has {Stemmer.algorithms()}") from exc
            counts = dict(zip(words["word"].to_list(), words["count"].to_list()))
            symspell = SymSpell(max_dictionary_edit_distance=self.max_edit_distance, prefix_length=7)
            for word in (words.filter((pl.col("count") >= self.min_count) & (pl.col("word").str.len_chars() >= self.min_length))
                         .head(self.max_words)["word"].to_list()):
                symspell.create_dictionary_entry(word, counts[word])
            # every spelling of a unit is as good as the one the catalog uses ("jnches" -> "inches")
            for unit, canonical in UNITS.items():
                count = max(counts.get(unit, 0), counts.get(canonical, 0))
                if len(unit) >= self.min_length and count >= self.min_count and unit not in symspell.words:
                    symspell.create_dictionary_entry(unit, count)
        except BaseException:
            self.device_ = None
            raise
        self.counts_ = counts
        self.stem_ = stem
        self.stems_ = {stem(w) for w in counts} if stem else set()
        self.memo_: dict[str, str] = {}
        self.symspell_ = symspell

    def correct_word(self, word: str) -> str:
        """The correction of one lower-case word (the word itself when it is known or has none)."""
        if len(word) < self.min_length or word in self.counts_ or word in UNITS or (self.stem_ and self.stem_(word) in self.stems_):
            return word
        from symspellpy import Verbosity

        distance = 1 if len(word) <= 5 else self.max_edit_distance
        # the fewest edits first; among those a word with the same first letter (typos rarely hit
        # it: "swith" -> "switch", not "with"), which a word that differs there needs at one edit
        found = [s for s in self.symspell_.lookup(word, Verbosity.ALL, max_edit_distance=distance)
                 if s.count >= self.min_count and (s.term[0] == word[0] or s.distance == 1)]
        best = min(found, key=lambda s: (s.distance, s.term[0] != word[0], -s.count, s.term)) if found else None
        split = None
        if self.split_compounds:
            for i in range(3, len(word) - 2):
                left, right = word[:i], word[i:]
                rarer = min(self.counts_.get(left, 0), self.counts_.get(right, 0))
                if rarer >= self.min_count and (split is None or rarer > split[0]):
                    split = (rarer, f"{left} {right}")
        if split and (best is None or best.distance >= 2 or split[0] * 10 >= best.count):
            return split[1]
        return best.term if best else word

    def correct(self, text: str) -> str:
        """``text`` with each misspelt word replaced (see the class docstring); other characters kept."""
        def fix(match: re.Match) -> str:
            typed = match.group(0)
            word = typed.lower()
            fixed = self.memo_.get(word)
            if fixed is None:
                if len(self.memo_) >= MEMO_SIZE:
                    self.memo_.clear()
                fixed = self.memo_[word] = self.correct_word(word)
            return typed if fixed == word else fixed
        return _WORD.sub(fix, text)

    def transform(self, table: pa.Table) -> pa.Table:
        typed = table.column(self.text_column)
        distinct = pc.unique(typed).drop_null().to_pylist()
        fixed = {text: self.correct(text) for text in distinct}
        corrected = pa.array([None if t is None else fixed[t] for t in typed.to_pylist()], pa.string())
        out = table.set_column(table.schema.get_field_index(self.text_column), pa.field(self.text_column, pa.string()), corrected)
        if self.original_column and self.original_column not in out.column_names:  # a second pass keeps the first
            out = out.append_column(pa.field(self.original_column, pa.string()), typed.cast(pa.string()))
        return out
