"""Query understanding: what a query asks for (product type, brand, colour, material, size), learned
from the judgments, as ranking features and an optional boost."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.artifacts import build_key, read_manifest, read_verified_manifest, sha256_file, write_json_atomic
from pipeline.columns import QUERY, QUERY_ID, RANK, SCORE
from pipeline.data import holdout_mask, read_catalog, read_judgments
from pipeline.errors import ArtifactError, DataError
from pipeline.schema import ANY, keep_input_types
from pipeline.stage import Pipeline, Stage, StageTags

from .features import feature_column

__all__ = ["QueryUnderstandingFeatures", "ATTRIBUTES", "product_type", "sizes", "query_terms"]

#: The attributes a query can ask for, in feature order.
ATTRIBUTES = ("type", "brand", "color", "material", "size")
#: Class of a query whose relevant items have no value for the attribute (no size asked for), and
#: of a value too rare in the training queries to learn.
NONE, OTHER = "~none", "~other"
#: Classes kept per query and attribute (the rest of the probability mass is dropped).
TOP_K = 32
MODEL_FILE, VOCAB_FILE, OOF_FILE = "model.safetensors", "vocab.json", "out_of_fold.parquet"

# the title up to its first finish/accessory clause: "... Door Sample in Light Cedar", "Grille, White",
# "Filter Bag for Shop-Vac", "Lantern (2-Pack)", "Seat with Lid"; "3/4 in." (a unit) does not cut
_CUT = re.compile(r"\s(?:in|with|for|and|w/)\s(?!\.)|[,(]|\s-\s")
_WORD = re.compile(r"[a-z]{2,}")
_UNITS = {"in": "in", "inch": "in", "inches": "in", "ft": "ft", "feet": "ft", "foot": "ft", "gal": "gal",
          "gallon": "gal", "gallons": "gal", "qt": "qt", "quart": "qt", "oz": "oz", "lb": "lb", "lbs": "lb",
          "w": "w", "watt": "w", "watts": "w", "v": "v", "volt": "v", "volts": "v", "amp": "amp", "amps": "amp",
          "mm": "mm", "cm": "cm", "gauge": "gauge", "ga": "gauge", "btu": "btu", "cfm": "cfm", "pack": "pack",
          "pk": "pack", "piece": "pack", "pc": "pack", "count": "pack", "ct": "pack", "sq": "sq", "cu": "cu",
          "light": "light", "lights": "light", "tier": "tier", "drawer": "drawer", "door": "door",
          "shelf": "shelf", "handle": "handle", "burner": "burner"}
_SIZE = re.compile(r"(\d+(?:[./-]\d+)*)\s*-?\s*(" + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")\b")
_TERM = re.compile(r"[a-z0-9]+(?:[./][0-9]+)*")


def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def product_type(title: str | None, stem=None) -> str | None:
    """The head noun of a product title: the last word (stemmed) before its first finish or
    accessory clause. "Elongated Toilet Seat in White" -> "seat", "Toilet Seat Bumper" -> "bumper",
    "Filter Bag for Shop-Vac Wet/Dry Vacs" -> "bag", "9 ft. Patio Umbrella in Red" -> "umbrella"."""
    if not title:
        return None
    text = _SIZE.sub(" ", title.lower())
    head = _CUT.split(text, maxsplit=1)[0]
    words = _WORD.findall(head) or _WORD.findall(text)
    if not words:
        return None
    word = words[-1]
    return (stem or _stemmer()).stemWord(word)


def sizes(title: str | None) -> list[str]:
    """The sizes in a text as normalised ``"<number> <unit>"`` strings: "3/4 in.", "60-Watt", "5 Gal." ->
    ``["3/4 in", "60 w", "5 gal"]``."""
    if not title:
        return []
    found = [f"{n} {_UNITS[u]}" for n, u in _SIZE.findall(title.lower())]
    return list(dict.fromkeys(found))


def query_terms(query: str, stem=None) -> list[str]:
    """What the classifier reads of a query: stemmed words, word pairs, and character 3-grams of each
    word (robust to misspellings: "toliet" shares "oli", "let" with "toilet")."""
    words = _TERM.findall((query or "").lower())
    stems = (stem or _stemmer()).stemWords(words)
    out = [f"w={s}" for s in stems]
    out += [f"b={a}_{b}" for a, b in zip(stems, stems[1:])]
    for w in words:
        if w.isalpha() and len(w) > 3:
            padded = f"<{w}>"
            out += [f"c={padded[i:i + 3]}" for i in range(len(padded) - 2)]
    return out


def _values(attribute: str, column: pl.Series, stem) -> list[list[str]]:
    """Per item, the values of ``attribute`` it has (lower-cased; types and sizes read from the title)."""
    if attribute == "type":
        return [[t] if (t := product_type(v, stem)) else [] for v in column.to_list()]
    if attribute == "size":
        return [sizes(v) for v in column.to_list()]
    if isinstance(column.dtype, pl.List):
        return [sorted({str(x).strip().lower() for x in v if x}) if v else [] for v in column.to_list()]
    return [[str(v).strip().lower()] if v else [] for v in column.to_list()]


class QueryUnderstandingFeatures(Stage):
    """Predict what a query asks for and add per candidate how well it fits, as ``f_qu_*`` features.

    ``funnel build`` learns one classifier per attribute in ``attributes`` from ``[data] judgments``
    and the catalog: for each training query, the label of an attribute is the value carried by
    most of its relevant items (relevance >= ``min_relevance``, weighted by relevance):

    * ``type`` — the product type, the head noun of the title (:func:`product_type`: the last word
      before "in <finish>", "with", "for", "," or "("): "shop vac" asks for a ``vac``, not a ``bag``;
    * ``brand``, ``color``, ``material`` — the catalog's own values (``*_column``; list columns
      such as colours count each element);
    * ``size`` — a number with its unit in the title (:func:`sizes`, "3/4 in", "60 w"), or none.

    A value carried by fewer than ``min_count`` training queries becomes one "other" class (at
    most ``max_classes`` classes per attribute); a query whose relevant items have no value
    (no brand, no size) is labelled "none", a query without a relevant item is not used. Each
    classifier is a complement naive Bayes (smoothing ``alpha``; scikit-learn's) over TF-IDF of
    the query's stemmed words, word pairs and character 3-grams (:func:`query_terms`), stored
    as safetensors + a JSON vocabulary + manifest (no pickle). On the Home Depot judgments it
    trains in seconds where a multinomial logistic regression took minutes per attribute for
    two points more type accuracy (0.41 against 0.39). Its nearly flat probabilities are
    sharpened by the temperature (a factor on the logits) that minimises the log loss on the
    out-of-fold (else validation) predictions, recorded in the manifest. The queries a ``holdout_fraction``/``seed`` hash holds out are never
    read — keep them equal to the ranker's (the defaults are). The manifest records each
    attribute's accuracy on ``valid_fraction`` of the training queries (split like the
    ranker's validation queries), with the model fitted on the others, against always
    predicting the most frequent class.

    At run time, per candidate and attribute:

    * ``f_qu_<attribute>`` — the predicted probability of the candidate's value (the largest
      over a list of colours; the "none" probability for a candidate without a value): a match
      with the predicted value weighted by the classifier's confidence, and partial credit for
      the second guess;
    * ``f_qu_<attribute>_conf`` — the probability of the predicted value (0 when the best guess
      is "none" or "other"): how much the query says about the attribute.

    A classifier predicts its own training queries almost perfectly, so a ranker trained on
    those features would trust them more than they deserve on new queries. With
    ``cross_fit = n`` (>= 2), the build also predicts every training query with a model fitted
    on the other ``n - 1`` folds, and the stage returns those out-of-fold probabilities for a
    training query (same ``query_id`` and text) — the ranker's build sees what a new query gets.

    With ``boost > 0`` the stage also adds ``boost * f_qu_<attribute>`` to ``score`` for each of
    ``boost_attributes`` whose confidence is at least ``min_confidence`` and renumbers ``rank`` by
    score (place it after the ranker): a soft filter that pushes accessories below the product
    a confident query asks for.
    """

    name = "features.query_understanding"
    input_schema = pa.schema([pa.field(QUERY_ID, ANY)])
    tags = StageTags(requires_build=True, level="candidate")
    path_params = ("model",)
    same_results_params = ("boost", "boost_attributes", "min_confidence")

    def __init__(self, model: str = "artifacts/query_understanding",
                 attributes: list[str] | tuple[str, ...] = ATTRIBUTES, query_column: str = QUERY,
                 title_column: str = "title", brand_column: str = "brand", color_column: str = "colors",
                 material_column: str = "materials", min_relevance: float = 2.5, min_count: int = 3,
                 max_classes: int = 500, alpha: float = 0.3, cross_fit: int = 5, valid_fraction: float = 0.2,
                 holdout_fraction: float = 0.2, seed: int = 0, boost: float = 0.0,
                 boost_attributes: list[str] | tuple[str, ...] = ("type",), min_confidence: float = 0.5):
        self.model = model
        self.attributes = attributes
        self.query_column = query_column
        self.title_column = title_column
        self.brand_column = brand_column
        self.color_column = color_column
        self.material_column = material_column
        self.min_relevance = min_relevance
        self.min_count = min_count
        self.max_classes = max_classes
        self.alpha = alpha
        self.cross_fit = cross_fit
        self.valid_fraction = valid_fraction
        self.holdout_fraction = holdout_fraction
        self.seed = seed
        self.boost = boost
        self.boost_attributes = boost_attributes
        self.min_confidence = min_confidence

    # -- schema ------------------------------------------------------------------------------

    def _column(self, attribute: str) -> str:
        return {"type": self.title_column, "size": self.title_column, "brand": self.brand_column,
                "color": self.color_column, "material": self.material_column}[attribute]

    def feature_names(self) -> list[str]:
        return [feature_column(f"qu_{a}{s}") for a in self.attributes for s in ("", "_conf")]

    def required_columns(self) -> pa.Schema:
        cols = {QUERY_ID: ANY, self.query_column: ANY}
        cols.update({self._column(a): ANY for a in self.attributes})
        if self.boost:
            cols.update({SCORE: ANY, RANK: ANY})
        return pa.schema([pa.field(c, t) for c, t in cols.items()])

    def produced_columns(self) -> pa.Schema:
        fields = [pa.field(f, pa.float32()) for f in self.feature_names()]
        if self.boost:
            fields += [pa.field(SCORE, pa.float32()), pa.field(RANK, pa.int32())]
        return pa.schema(fields)

    def validate_params(self) -> None:
        super().validate_params()

        def number(v, lo, hi=float("inf")):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi

        if (not isinstance(self.attributes, (list, tuple)) or not self.attributes
                or any(a not in ATTRIBUTES for a in self.attributes) or len(set(self.attributes)) != len(self.attributes)):
            raise self._bad_param("attributes", f"a non-empty list of distinct names drawn from {', '.join(ATTRIBUTES)}")
        for p in ("query_column", "title_column", "brand_column", "color_column", "material_column"):
            if not isinstance(getattr(self, p), str) or not getattr(self, p):
                raise self._bad_param(p, "a column name")
        if not number(self.min_relevance, float("-inf")):
            raise self._bad_param("min_relevance", "a number")
        for p, lo in (("min_count", 1), ("max_classes", 1)):
            if not isinstance(getattr(self, p), int) or isinstance(getattr(self, p), bool) or getattr(self, p) < lo:
                raise self._bad_param(p, f"an int >= {lo}")
        if not number(self.alpha, 0) or self.alpha == 0:
            raise self._bad_param("alpha", "a number > 0")
        if not isinstance(self.cross_fit, int) or isinstance(self.cross_fit, bool) or self.cross_fit < 0 or self.cross_fit == 1:
            raise self._bad_param("cross_fit", "0 (off) or an int >= 2 (folds)")
        for p in ("valid_fraction", "holdout_fraction"):
            if not number(getattr(self, p), 0, 1) or getattr(self, p) == 1:
                raise self._bad_param(p, "a number in [0, 1)")
        if not number(self.boost, 0):
            raise self._bad_param("boost", "a number >= 0 (0: features only)")
        if not isinstance(self.boost_attributes, (list, tuple)) or any(a not in self.attributes for a in self.boost_attributes):
            raise self._bad_param("boost_attributes", f"a list drawn from attributes {list(self.attributes)}")
        if not number(self.min_confidence, 0, 1):
            raise self._bad_param("min_confidence", "a number in [0, 1]")

    # -- build -------------------------------------------------------------------------------

    def _labels(self, judgments: pl.DataFrame, catalog: pl.DataFrame) -> pl.DataFrame:
        """One row per training query: its text and one label per attribute (NONE when its
        relevant items carry no value)."""
        stem = _stemmer()
        rel = judgments.filter(pl.col("relevance") >= self.min_relevance)
        items = catalog.filter(pl.col("item_id").is_in(rel["item_id"].unique().implode()))
        values = pl.DataFrame({"item_id": items["item_id"]})
        for a in self.attributes:
            values = values.with_columns(_list_series(a, _values(a, items[self._column(a)], stem)))
        rel = rel.join(values, on="item_id", how="inner")
        # a query without a relevant item says nothing about what it asks for
        queries = rel.select(QUERY_ID, QUERY).unique(QUERY_ID, keep="first").sort(QUERY_ID)
        for a in self.attributes:
            votes = (rel.select(QUERY_ID, pl.col(a), "relevance").explode(a).drop_nulls(a)
                     .group_by(QUERY_ID, a).agg(pl.col("relevance").sum().alias("w"))
                     .sort([QUERY_ID, "w", a], descending=[False, True, False]).unique(QUERY_ID, keep="first"))
            queries = (queries.join(votes.select(QUERY_ID, a), on=QUERY_ID, how="left")
                       .with_columns(pl.col(a).fill_null(NONE)))
        return queries

    def _classes(self, labels: pl.Series) -> list[str]:
        counts = labels.filter(~labels.is_in([NONE])).value_counts(sort=True, name="n")
        kept = counts.filter(pl.col("n") >= self.min_count).sort(["n", labels.name], descending=[True, False])
        return [NONE, OTHER, *kept[labels.name].head(self.max_classes).to_list()]

    @staticmethod
    def _fit(X, y: np.ndarray, n_classes: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Complement naive Bayes: ``softmax(X @ coef.T + bias)`` is its ``predict_proba``, for all
        ``n_classes`` (a class absent from ``y`` gets probability 0)."""
        from sklearn.naive_bayes import ComplementNB

        coef = np.zeros((n_classes, X.shape[1]), dtype=np.float32)
        bias = np.full(n_classes, -1e4, dtype=np.float32)
        present = np.unique(y)
        if len(present) == 1:
            bias[present[0]] = 0.0
            return coef, bias
        clf = ComplementNB(alpha=alpha).fit(X, y)
        coef[clf.classes_], bias[clf.classes_] = clf.feature_log_prob_, 0.0
        return coef, bias

    def build(self, upstream: Pipeline | None, ctx: Any) -> str:
        """Learn the classifiers; skipped when judgments, catalog and parameters are unchanged."""
        from scipy import sparse
        from safetensors.numpy import save_file
        from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

        folder = self.resolve_path(self.model)
        judgments_path, catalog_path = ctx.data_path("judgments"), ctx.data_path("catalog")
        key = build_key(stage=self.name, params={k: v for k, v in self.get_params().items()
                                                 if k not in self.same_results_params},
                        judgments=sha256_file(judgments_path), catalog=sha256_file(catalog_path))
        if not ctx.force and (folder / "manifest.json").exists() and read_manifest(folder, what="query understanding").get("build_key") == key:
            return f"{self.name}: up to date ({folder})"

        judgments = pl.from_arrow(read_judgments(judgments_path))
        query_ids = judgments.select(QUERY_ID).unique().sort(QUERY_ID)[QUERY_ID]
        held = pl.Series(holdout_mask(query_ids.to_arrow(), self.holdout_fraction, self.seed))
        train_ids = query_ids.filter(~held)
        judgments = judgments.filter(pl.col(QUERY_ID).is_in(train_ids.implode()))
        catalog = pl.from_arrow(read_catalog(catalog_path, sorted({self._column(a) for a in self.attributes})))
        labels = self._labels(judgments, catalog)
        if labels.height < 2:
            raise DataError(f"stage '{self.name}': {judgments_path} leaves {labels.height} training queries after the "
                            f"holdout (holdout_fraction={self.holdout_fraction}); the classifiers need at least 2")

        stem = _stemmer()
        terms = [query_terms(q, stem) for q in labels[QUERY].to_list()]
        vectorizer = CountVectorizer(analyzer=lambda t: t, min_df=min(2, len(terms)), binary=True)
        counts = vectorizer.fit_transform(terms)
        tfidf = TfidfTransformer(sublinear_tf=True).fit(counts)
        X = sparse.csr_matrix(tfidf.transform(counts), dtype=np.float32)
        vocab = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)

        valid = np.array(holdout_mask(labels[QUERY_ID].to_arrow(), self.valid_fraction, self.seed + 1), dtype=bool)
        folds = (np.array([hash_fold(q, self.cross_fit, self.seed) for q in labels[QUERY_ID].to_list()])
                 if self.cross_fit else None)
        tensors: dict[str, np.ndarray] = {"idf": tfidf.idf_.astype(np.float32)}
        classes, accuracy, oof, temperatures = {}, {}, [], {}
        for a in self.attributes:
            cls = self._classes(labels[a])
            index = {c: i for i, c in enumerate(cls)}
            y = np.array([index.get(v, 1) for v in labels[a].to_list()])
            held_logits = None  # logits of queries a model did not see: they set the temperature
            if valid.any() and (~valid).any():
                coef, bias = self._fit(X[~valid], y[~valid], len(cls), self.alpha)
                held_logits, held_y = np.asarray(X[valid] @ coef.T + bias), y[valid]
                majority = np.bincount(y[~valid], minlength=len(cls)).argmax()
                accuracy[a] = {"accuracy": round(float((held_logits.argmax(axis=1) == held_y).mean()), 4),
                               "majority_baseline": round(float((held_y == majority).mean()), 4),
                               "valid_queries": int(valid.sum()), "majority_class": cls[majority]}
            if folds is not None:
                logits, seen = np.zeros((len(y), len(cls)), dtype=np.float32), np.zeros(len(y), dtype=bool)
                for f in range(self.cross_fit):
                    inside = folds == f
                    if not inside.any() or inside.all():
                        continue
                    coef, bias = self._fit(X[~inside], y[~inside], len(cls), self.alpha)
                    logits[inside], seen[inside] = np.asarray(X[inside] @ coef.T + bias), True
                held_logits, held_y = logits[seen], y[seen]
            t = _temperature(held_logits, held_y) if held_logits is not None and len(held_y) else 1.0
            if folds is not None:
                oof.append(_top_k(_softmax(t * held_logits), cls, a, labels[QUERY_ID].filter(pl.Series(seen)),
                                  labels[QUERY].filter(pl.Series(seen))))
            coef, bias = self._fit(X, y, len(cls), self.alpha)
            tensors[f"{a}.coef"], tensors[f"{a}.bias"] = coef * t, bias * t
            classes[a], temperatures[a] = cls, t

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / MODEL_FILE))
        write_json_atomic(folder / VOCAB_FILE, {"terms": vocab, "classes": classes})
        files = [MODEL_FILE, VOCAB_FILE]
        if oof:
            pl.concat(oof).write_parquet(folder / OOF_FILE)
            files.append(OOF_FILE)
        write_json_atomic(folder / "manifest.json", {
            "kind": "query-understanding", "build_key": key, "attributes": list(self.attributes),
            "train_queries": labels.height, "terms": len(vocab), "classes": {a: len(c) for a, c in classes.items()},
            "valid_accuracy": accuracy, "temperatures": temperatures, "files": {f: sha256_file(folder / f) for f in files},
        })
        shown = ", ".join(f"{a} {v['accuracy']:.2f} (majority {v['majority_baseline']:.2f})" for a, v in accuracy.items())
        return (f"{self.name}: {labels.height} training queries, {len(vocab)} terms; validation accuracy "
                f"{shown or 'not measured'} in {folder}")

    # -- run ---------------------------------------------------------------------------------

    def warm_up(self) -> None:
        super().warm_up()
        if getattr(self, "coef_", None) is not None:
            return
        from safetensors.numpy import load_file

        folder = self.resolve_path(self.model)
        what = f"stage '{self.name}' model"
        manifest = read_verified_manifest(folder, what=what)
        if manifest.get("attributes") != list(self.attributes):
            raise ArtifactError(f"{what} in {folder} predicts attributes {manifest.get('attributes')}, the parameters "
                                f"ask for {list(self.attributes)}; run `funnel build`")
        tensors = load_file(str(folder / MODEL_FILE))
        vocab = json.loads((folder / VOCAB_FILE).read_text())
        self.terms_ = {t: i for i, t in enumerate(vocab["terms"])}
        self.idf_ = tensors["idf"]
        self.classes_ = vocab["classes"]
        self.coef_ = {a: (tensors[f"{a}.coef"], tensors[f"{a}.bias"]) for a in self.attributes}
        self.oof_ = pl.read_parquet(folder / OOF_FILE) if (folder / OOF_FILE).exists() else None
        self.stem_ = _stemmer()
        self.cache_: dict[str, dict[str, list[str]]] = {}

    def predict(self, queries: list[str]) -> dict[str, np.ndarray]:
        """Per attribute, the class probabilities of each query (rows) over ``classes_[attribute]``."""
        from scipy import sparse

        rows, cols = [], []
        for r, q in enumerate(queries):
            idx = sorted({self.terms_[t] for t in query_terms(q, self.stem_) if t in self.terms_})
            rows += [r] * len(idx)
            cols += idx
        X = sparse.csr_matrix((self.idf_[cols], (rows, cols)), shape=(len(queries), len(self.terms_)), dtype=np.float32)
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1))).ravel()
        X = sparse.diags(np.where(norms > 0, 1 / np.maximum(norms, 1e-12), 0).astype(np.float32)) @ X
        return {a: _softmax(np.asarray(X @ coef.T + bias)) for a, (coef, bias) in self.coef_.items()}

    def _query_probs(self, queries: pl.DataFrame) -> pl.DataFrame:
        """Long table ``__q, attribute, value, prob`` (top classes) for the distinct queries ``__q``."""
        parts = []
        if self.oof_ is not None:
            known = queries.join(self.oof_, on=[QUERY_ID, QUERY], how="inner")
            parts.append(known.select("__q", "attribute", "value", "prob"))
            queries = queries.filter(~pl.col("__q").is_in(known["__q"].unique().implode()))
        if queries.height:
            probs = self.predict(queries[QUERY].to_list())
            for a in self.attributes:
                parts.append(_top_k(probs[a], self.classes_[a], a, queries["__q"], None, key="__q"))
        return pl.concat(parts) if parts else pl.DataFrame(schema={"__q": pl.UInt32, "attribute": pl.String,
                                                                   "value": pl.String, "prob": pl.Float32})

    def _candidate_values(self, frame: pl.DataFrame, attribute: str) -> pl.Series:
        """Per candidate row, its values of ``attribute`` (a list<str> Series named ``value``)."""
        col = self._column(attribute)
        if attribute in ("type", "size"):
            # read from the title in Python: once per distinct title, remembered across batches
            # (at most one entry per catalog title)
            cache = self.cache_.setdefault(attribute, {})
            titles = frame[col].cast(pl.String).to_list()
            missing = list({t for t in titles if t not in cache})
            if missing:
                cache.update(zip(missing, _values(attribute, pl.Series(missing, dtype=pl.String), self.stem_)))
            return _list_series("value", [cache[t] for t in titles])
        if isinstance(frame.schema[col], pl.List):
            clean = pl.element().cast(pl.String).str.strip_chars().str.to_lowercase()
            expr = pl.col(col).list.eval(clean.filter(clean.str.len_chars() > 0))
        else:
            v = pl.col(col).cast(pl.String).str.strip_chars().str.to_lowercase()
            expr = pl.when(v.str.len_chars() > 0).then(v.str.split("\x00"))
        return frame.select(expr.cast(pl.List(pl.String)).alias("value")).to_series()

    def transform(self, table: pa.Table) -> pa.Table:
        names = self.feature_names()
        frame = pl.from_arrow(table).drop([c for c in names if c in table.column_names]).with_row_index("__row")
        qcol = self.query_column
        queries = (frame.select(pl.col(QUERY_ID), pl.col(qcol).fill_null("").alias(QUERY)).unique(maintain_order=True)
                   .with_row_index("__q"))
        if self.oof_ is not None and queries.schema[QUERY_ID] != self.oof_.schema[QUERY_ID]:
            queries = queries.with_columns(pl.col(QUERY_ID).cast(self.oof_.schema[QUERY_ID], strict=False))
        probs = self._query_probs(queries) if frame.height else None
        rows = frame.select("__row", pl.col(QUERY_ID), pl.col(qcol).fill_null("").alias(QUERY))
        rows = rows.with_columns(pl.col(QUERY_ID).cast(queries.schema[QUERY_ID], strict=False)).join(
            queries, on=[QUERY_ID, QUERY], how="left", maintain_order="left").select("__row", "__q")
        features = {}
        for a in self.attributes:
            values = self._candidate_values(frame, a)
            cand = (rows.with_columns(values.alias("value"))
                    .with_columns(pl.when(pl.col("value").list.len() > 0).then(pl.col("value"))
                                  .otherwise(pl.lit([NONE], dtype=pl.List(pl.String))))
                    .explode("value"))
            p = probs.filter(pl.col("attribute") == a) if probs is not None else None
            if p is not None and p.height:
                hit = cand.join(p.select("__q", "value", "prob"), on=["__q", "value"], how="left")
                match = hit.group_by("__row").agg(pl.col("prob").max().fill_null(0.0)).sort("__row")["prob"]
                conf = (p.filter(~pl.col("value").is_in([NONE, OTHER])).group_by("__q").agg(pl.col("prob").max()))
                conf = rows.join(conf, on="__q", how="left", maintain_order="left")["prob"].fill_null(0.0)
            else:
                match = conf = pl.Series([0.0] * frame.height)
            features[feature_column(f"qu_{a}")] = match.cast(pl.Float32)
            features[feature_column(f"qu_{a}_conf")] = conf.cast(pl.Float32)
        out = frame.drop("__row").with_columns(pl.Series(n, features[n], dtype=pl.Float32) for n in names)
        if self.boost and out.height:
            add = sum(pl.when(pl.col(feature_column(f"qu_{a}_conf")) >= self.min_confidence)
                      .then(pl.col(feature_column(f"qu_{a}"))).otherwise(0.0) for a in self.boost_attributes)
            out = out.with_columns((pl.col(SCORE).cast(pl.Float32) + self.boost * add).cast(pl.Float32).alias(SCORE))
            out = out.with_columns(pl.col(SCORE).rank("ordinal", descending=True).over(QUERY_ID).cast(pl.Int32).alias(RANK))
        return keep_input_types(out.to_arrow(), table.schema)


def _list_series(name: str, values: list[list[str]]) -> pl.Series:
    """A list<str> Series (through Arrow: Polars builds one from nested Python lists element by element)."""
    return pl.Series(name, pa.array(values, pa.list_(pa.string())))


def hash_fold(query_id: Any, folds: int, seed: int) -> int:
    """The cross-fitting fold of a query id (hash-based, like :func:`pipeline.data.holdout_mask`)."""
    import hashlib

    h = hashlib.blake2b(f"fold{seed}:{query_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % folds


def _temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The factor on the logits that minimises the log loss of held-out predictions: naive Bayes
    over TF-IDF gives nearly flat probabilities (the best guess rarely above 0.05 on Home Depot
    queries); scaled, they say how sure it is."""
    best, best_loss = 1.0, float("inf")
    for t in (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0):
        p = _softmax(t * logits)[np.arange(len(y)), y]
        loss = float(-np.log(np.maximum(p, 1e-12)).mean())
        if loss < best_loss:
            best, best_loss = t, loss
    return best


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _top_k(probs: np.ndarray, classes: list[str], attribute: str, keys: pl.Series, texts: pl.Series | None,
           key: str = QUERY_ID) -> pl.DataFrame:
    """Long table of the ``TOP_K`` most probable classes per row of ``probs``."""
    k = min(TOP_K, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(probs.shape[0]), k)
    cols = top.ravel()
    out = pl.DataFrame({key: keys.gather(rows), "attribute": pl.Series([attribute] * len(rows), dtype=pl.String),
                        "value": pl.Series(np.array(classes, dtype=object)[cols].tolist(), dtype=pl.String),
                        "prob": probs[rows, cols].astype(np.float32)})
    if texts is not None:
        out = out.with_columns(texts.gather(rows).alias(QUERY))
    return out.filter(pl.col("prob") > 1e-4)
