"""A synthetic home-improvement search data set, generated from a seed.

Funnel ships no real data; examples, tests and smoke benchmarks run on what this module writes.
The files mirror the layout of the Home Depot relevance data (see ``../shared/data/README.md``)
so that the same code runs on both:

``catalog.parquet``
    ``item_id``, ``title``, ``brand``, ``category``, ``color``, ``material``, ``price``,
    ``in_stock``, ``popularity``.
``queries.parquet``
    ``query_id``, ``query``.
``judgments.parquet``
    ``query_id``, ``query``, ``item_id``, ``relevance`` (1 = irrelevant ... 3 = exact match).

The generative model, in three steps:

1. **Catalog.** 40 product types in 8 categories; each type has a title name, the words users
   search it by (synonyms, some shared between types such as ``screws`` or ``faucet``), and its
   own sizes, colours, materials and price range. A *family* is one product: a type, a brand
   (25 invented brands, each selling in three categories; 10% of families are unbranded), a
   material, a model number and a title template. Each family has 1-4 *variants* that differ in
   colour and/or size only, which gives the near-duplicates a real catalog has. Brand is also
   blanked in the ``brand`` column for another ~10% of items whose title still names it (a
   missing attribute, as in real feeds); relevance uses the true brand.
2. **Queries.** Each query starts from a seed item drawn by popularity and an *intent*: the type
   alone, the type plus one or two attributes (colour, size, material), brand plus type, the
   brand alone, or the model number. The text uses a synonym rather than the title's wording
   half the time, shortens sizes ("60-Watt Equivalent" -> "60 watt"), and misspells one word in
   ~8% of queries, so lexical and semantic matching both matter.
3. **Judgments.** A deterministic function grades every (intent, item) pair in thirds, like the
   mean of three raters: 3 for an item of the wanted type matching every stated attribute, one
   third (two for brand) less per mismatched attribute down to 2; 1.67 for a related type (same
   category) sharing the brand or colour, 1.33 for the same category, 1 otherwise. Model-number
   queries grade the family 3, same type and brand 2.33, same type 2. Brand-only queries grade
   the brand's items 3. The 5-10 judged items of a query are one item of the top grade plus a
   sample stratified by grade that leans to the good ones, like the results a live engine shows
   to raters; within a grade (and for the top-grade item) an item is picked in proportion to its
   ``popularity``, as an engine shows popular items first. So among many equally relevant items
   (every drill for "drill") the judged ones are the popular ones, a signal a ranker with a
   popularity feature learns and the text alone does not carry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["generate_demo_data"]

# (title name, category, query synonyms, sizes, colours, materials, (min price, max price))
_TYPES = [
    ("Cordless Drill/Driver", "Power Tools", ["cordless drill", "drill", "power drill", "drill driver"],
     ["12-Volt", "18-Volt", "20-Volt"], [], [], (59, 229)),
    ("Impact Driver", "Power Tools", ["impact driver", "impact drill", "impact gun"],
     ["12-Volt", "18-Volt", "20-Volt"], [], [], (79, 249)),
    ("Circular Saw", "Power Tools", ["circular saw", "skil saw", "saw"], ["6-1/2 in.", "7-1/4 in."], [], [], (49, 199)),
    ("Random Orbital Sander", "Power Tools", ["orbital sander", "sander", "palm sander"], ["5 in.", "6 in."], [], [],
     (39, 149)),
    ("Jig Saw", "Power Tools", ["jigsaw", "jig saw", "saw"], ["5-Amp", "6.5-Amp"], [], [], (39, 169)),
    ("LED Light Bulb", "Lighting", ["led light bulb", "light bulb", "bulb", "led bulbs"],
     ["40-Watt Equivalent", "60-Watt Equivalent", "100-Watt Equivalent"], ["Soft White", "Daylight", "Bright White"],
     [], (4, 29)),
    ("Ceiling Fan", "Lighting", ["ceiling fan", "fan", "ceiling fan with light"], ["44 in.", "52 in.", "60 in."],
     ["White", "Brushed Nickel", "Matte Black", "Oil Rubbed Bronze"], [], (79, 349)),
    ("Pendant Light", "Lighting", ["pendant light", "hanging light", "pendant lamp"], ["1-Light", "3-Light"],
     ["Matte Black", "Brushed Nickel", "Gold"], ["Glass", "Metal"], (39, 199)),
    ("LED Flood Light", "Lighting", ["flood light", "outdoor security light", "floodlight"],
     ["1500 Lumens", "3000 Lumens"], ["Bronze", "White"], ["Aluminum"], (24, 99)),
    ("Recessed Light Kit", "Lighting", ["recessed light", "can light", "pot light"], ["4 in.", "6 in."], ["White"], [],
     (9, 59)),
    ("Deck Screws", "Fasteners", ["deck screws", "decking screws", "exterior screws", "screws"],
     ["#8 x 2 in.", "#9 x 2-1/2 in.", "#10 x 3 in."], [], ["Stainless Steel", "Coated Steel"], (8, 49)),
    ("Drywall Screws", "Fasteners", ["drywall screws", "sheetrock screws", "screws"],
     ["#6 x 1-1/4 in.", "#6 x 1-5/8 in."], [], ["Phosphate Steel"], (6, 29)),
    ("Wood Screws", "Fasteners", ["wood screws", "screws"], ["#8 x 1 in.", "#8 x 1-1/2 in.", "#10 x 2 in."], [],
     ["Zinc Plated Steel", "Brass"], (4, 19)),
    ("Wall Anchors", "Fasteners", ["wall anchors", "drywall anchors", "anchors"], ["25-Pack", "50-Pack", "100-Pack"],
     [], ["Plastic", "Zinc"], (3, 19)),
    ("Hex Bolt", "Fasteners", ["hex bolt", "bolts", "hex bolts"], ["1/4 in. x 2 in.", "3/8 in. x 3 in.", "1/2 in. x 4 in."],
     [], ["Zinc Plated Steel", "Stainless Steel", "Galvanized Steel"], (1, 12)),
    ("Luxury Vinyl Plank Flooring", "Flooring", ["vinyl flooring", "vinyl plank", "lvp flooring", "vinyl floor"],
     ["6 in. x 36 in.", "7 in. x 48 in."], ["Gray Oak", "Natural Oak", "Walnut", "Whitewashed"], ["Vinyl"], (39, 99)),
    ("Laminate Flooring", "Flooring", ["laminate flooring", "laminate", "laminate floor"], ["8 mm", "12 mm"],
     ["Gray Oak", "Natural Oak", "Hickory"], [], (29, 89)),
    ("Floor Tile", "Flooring", ["ceramic tile", "floor tile", "tile"], ["12 in. x 12 in.", "12 in. x 24 in."],
     ["White", "Beige", "Gray", "Black"], ["Ceramic", "Porcelain"], (1, 5)),
    ("Carpet Tile", "Flooring", ["carpet tile", "carpet squares", "carpet"], ["19.7 in. x 19.7 in.", "24 in. x 24 in."],
     ["Charcoal", "Beige", "Blue"], [], (19, 79)),
    ("Engineered Hardwood Flooring", "Flooring", ["hardwood flooring", "wood flooring", "engineered hardwood"],
     ["3/8 in. x 5 in.", "1/2 in. x 7-1/2 in."], ["Natural Oak", "Hickory", "Walnut"], ["Oak", "Hickory", "Maple"],
     (49, 149)),
    ("Garden Hose", "Outdoor & Garden", ["garden hose", "water hose", "hose"],
     ["5/8 in. x 50 ft.", "5/8 in. x 100 ft.", "3/4 in. x 75 ft."], ["Green", "Black", "Blue"], ["Rubber", "Vinyl"],
     (19, 89)),
    ("Hose Nozzle", "Outdoor & Garden", ["hose nozzle", "spray nozzle", "hose sprayer"], ["7-Pattern", "10-Pattern"], [],
     ["Metal", "Plastic"], (6, 29)),
    ("Gas Push Lawn Mower", "Outdoor & Garden", ["lawn mower", "mower", "push mower", "gas mower"], ["21 in.", "22 in."],
     [], [], (229, 499)),
    ("Leaf Blower", "Outdoor & Garden", ["leaf blower", "blower", "cordless blower"], ["40-Volt", "60-Volt"], [], [],
     (99, 299)),
    ("Planter", "Outdoor & Garden", ["planter", "flower pot", "plant pot"], ["8 in.", "12 in.", "16 in."],
     ["Terra Cotta", "White", "Black", "Gray"], ["Resin", "Ceramic", "Clay"], (9, 69)),
    ("Paint Roller Cover", "Paint", ["paint roller", "roller", "roller cover"], ["9 in. x 3/8 in.", "9 in. x 1/2 in."],
     [], ["Microfiber", "Woven"], (4, 19)),
    ("Paint Brush", "Paint", ["paint brush", "brush", "angled brush"], ["2 in.", "2-1/2 in.", "3 in."], [],
     ["Nylon", "Polyester"], (5, 24)),
    ("Interior Paint", "Paint", ["interior paint", "wall paint", "paint"], ["1 qt.", "1 gal.", "5 gal."],
     ["Ultra Pure White", "Gray", "Beige", "Navy Blue"], [], (14, 189)),
    ("Exterior Wood Stain", "Paint", ["exterior stain", "deck stain", "wood stain"], ["1 gal.", "5 gal."],
     ["Cedar", "Redwood", "Gray", "Clear"], [], (29, 199)),
    ("Painter's Tape", "Paint", ["painters tape", "masking tape", "blue tape"], ["0.94 in. x 60 yd.", "1.88 in. x 60 yd."],
     ["Blue", "Green"], [], (4, 14)),
    ("Kitchen Faucet", "Plumbing", ["kitchen faucet", "faucet", "kitchen sink faucet", "pull down faucet"],
     ["Single-Handle", "Pull-Down"], ["Chrome", "Stainless Steel", "Matte Black", "Brushed Nickel"], [], (69, 299)),
    ("Bathroom Faucet", "Plumbing", ["bathroom faucet", "faucet", "bathroom sink faucet", "lavatory faucet"],
     ["4 in. Centerset", "8 in. Widespread"], ["Chrome", "Brushed Nickel", "Matte Black", "Oil Rubbed Bronze"], [],
     (39, 199)),
    ("Shower Head", "Plumbing", ["shower head", "showerhead", "rain shower"], ["1.8 GPM", "2.5 GPM"],
     ["Chrome", "Brushed Nickel", "Matte Black"], [], (19, 149)),
    ("Toilet", "Plumbing", ["toilet", "elongated toilet", "commode"], ["Round", "Elongated"], ["White", "Biscuit"],
     ["Vitreous China"], (99, 399)),
    ("PVC Pipe", "Plumbing", ["pvc pipe", "pipe", "pvc"], ["1/2 in. x 10 ft.", "3/4 in. x 10 ft.", "1 in. x 10 ft."], [],
     ["PVC"], (3, 19)),
    ("Door Knob", "Hardware", ["door knob", "doorknob", "door handle"], ["Passage", "Privacy", "Keyed Entry"],
     ["Satin Nickel", "Matte Black", "Polished Brass"], [], (9, 49)),
    ("Cabinet Pull", "Hardware", ["cabinet pull", "drawer pull", "cabinet handle"], ["3 in.", "3-3/4 in.", "5-1/16 in."],
     ["Satin Nickel", "Matte Black", "Polished Brass"], ["Zinc", "Stainless Steel"], (2, 9)),
    ("Shelf Bracket", "Hardware", ["shelf bracket", "bracket", "shelf support"], ["8 in.", "10 in.", "12 in."],
     ["White", "Black"], ["Steel"], (3, 15)),
    ("Storage Bin", "Hardware", ["storage bin", "storage tote", "tote"], ["18 Gal.", "27 Gal."],
     ["Black", "Clear", "Gray"], ["Plastic"], (7, 29)),
    ("Tool Box", "Hardware", ["tool box", "toolbox", "tool chest"], ["16 in.", "22 in.", "26 in."], ["Red", "Black"],
     ["Plastic", "Steel"], (14, 99)),
]

_BRANDS = [
    "Ironvale", "Brightpath", "Stonewick", "Copperleaf", "Halvane", "Tidewell", "Pinebrook", "Maplecroft",
    "Bluestem", "Oakhollow", "Harborlyn", "Kestrelton", "Summitra", "Fernway", "Ashgrove", "Luminaro",
    "Quarrystone", "Drayfield", "Cobaltix", "Willowmere", "Grayhaven", "Vantrell", "Zephlor", "Norvik", "Emberline",
]

# Title templates: {b} brand, {s} size, {c} colour, {m} material, {t} type name; {cc} is ", colour"
# and {ic} " in colour" (empty without a colour). A model number, when shown, ends the title.
_TEMPLATES = [
    "{b} {s} {c} {m} {t}",
    "{b} {t}, {s}{cc}",
    "{s} {m} {t}{ic}",
    "{b} {c} {t} ({s})",
    "{b} {m} {t} {s} {c}",
]

_CATEGORIES = sorted({t[1] for t in _TYPES})
_COLORS = sorted({c for t in _TYPES for c in t[4]})
_MATERIALS = sorted({m for t in _TYPES for m in t[5]})
_SIZES = sorted({s for t in _TYPES for s in t[3]})
# a query word shared by several types ("screws", "faucet", "saw") means all of them
_SYNONYM_TYPES: dict[str, list[int]] = {}
for _i, _t in enumerate(_TYPES):
    for _s in _t[2]:
        _SYNONYM_TYPES.setdefault(_s, []).append(_i)

# sampling weight of each grade, indexed in thirds (3 = 1.0 ... 9 = 3.0), when picking items to judge
_GRADE_WEIGHT = np.array([0, 0, 0, 0.5, 0.9, 1.2, 1.4, 1.8, 1.8, 1.4])


def _short_size(size: str) -> str:
    """How users type a size: "60-Watt Equivalent" -> "60 watt", "3/4 in." -> "3/4 in"."""
    s = size.lower().replace(" equivalent", "").replace("-watt", " watt").replace("-volt", "v")
    return s.replace(" in.", " in").replace(" ft.", " ft").replace(" gal.", " gal").rstrip(".")


def _misspell(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    long = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not long:
        return text
    i = long[int(rng.integers(len(long)))]
    w = words[i]
    j = int(rng.integers(1, len(w) - 1))
    op = int(rng.integers(3))
    if op == 0:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2:]  # swap two letters
    elif op == 1:
        w = w[:j] + w[j + 1:]  # drop a letter
    else:
        w = w[:j] + w[j] + w[j:]  # double a letter
    words[i] = w
    return " ".join(words)


def _catalog(rng: np.random.Generator, n_items: int) -> dict[str, np.ndarray | list]:
    """Item attributes as codes (for grading) and strings (for the file)."""
    n_types = len(_TYPES)
    brand_cats = np.stack([rng.choice(len(_CATEGORIES), 3, replace=False) for _ in _BRANDS])
    type_weight = rng.uniform(0.5, 1.5, n_types)
    rows: dict[str, list] = {k: [] for k in
                             ("type", "brand", "size", "color", "material", "family", "title", "price", "model")}
    family = 0
    while len(rows["type"]) < n_items:
        t = int(rng.choice(n_types, p=type_weight / type_weight.sum()))
        name, cat, _, sizes, colors, materials, (lo, hi) = _TYPES[t]
        makers = np.flatnonzero((brand_cats == _CATEGORIES.index(cat)).any(axis=1))
        brand = -1 if rng.random() < 0.1 or len(makers) == 0 else int(rng.choice(makers))
        material = _MATERIALS.index(materials[rng.integers(len(materials))]) if materials else -1
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        prefix = _BRANDS[brand][:2].upper() if brand >= 0 else "GX"
        model = f"{prefix}{int(rng.integers(100, 9999))}" if rng.random() < 0.6 else ""
        base = rng.uniform(lo, hi)
        n_var = int(rng.integers(1, 5))
        # variants: distinct (size, colour) pairs of this type
        combos = [(s, c) for s in range(len(sizes)) for c in range(max(len(colors), 1))]
        picks = rng.choice(len(combos), min(n_var, len(combos)), replace=False)
        for p in picks:
            s, c = combos[int(p)]
            color = _COLORS.index(colors[c]) if colors else -1
            color_name = _COLORS[color] if color >= 0 else ""
            title = template.format(
                b=_BRANDS[brand] if brand >= 0 else "",
                s=sizes[s],
                c=color_name,
                cc=f", {color_name}" if color_name else "",
                ic=f" in {color_name}" if color_name else "",
                m=_MATERIALS[material] if material >= 0 and _MATERIALS[material] not in name else "",
                t=name,
            )
            title = " ".join(title.split()) + (f" (Model {model})" if model else "")
            rows["type"].append(t)
            rows["brand"].append(brand)
            rows["size"].append(_SIZES.index(sizes[s]))
            rows["color"].append(color)
            rows["material"].append(material)
            rows["family"].append(family)
            rows["title"].append(title)
            rows["price"].append(np.floor(base * (1 + 0.35 * s)) + 0.97)
            rows["model"].append(model)
        family += 1
    order = rng.permutation(len(rows["type"]))[:n_items]
    cat = {k: [v[i] for i in order] for k, v in rows.items()}
    codes = {k: np.asarray(cat[k], dtype=np.int64) for k in ("type", "brand", "size", "color", "material", "family")}
    codes["category"] = np.array([_CATEGORIES.index(_TYPES[t][1]) for t in codes["type"]], dtype=np.int64)
    codes["title"] = cat["title"]
    codes["model"] = cat["model"]
    codes["price"] = np.asarray(cat["price"], dtype=np.float64)
    codes["popularity"] = np.round(rng.lognormal(0.0, 1.2, n_items), 4)
    codes["in_stock"] = rng.random(n_items) < 0.9
    # the brand attribute is missing for some branded items too (the title still names it)
    codes["brand_shown"] = np.where(rng.random(n_items) < 0.1, -1, codes["brand"])
    return codes


def _query(rng: np.random.Generator, items: dict, seed_item: int) -> tuple[str, dict]:
    """Text and intent of one query derived from ``seed_item``."""
    t = int(items["type"][seed_item])
    name, _, synonyms, _, _, _, _ = _TYPES[t]
    brand = int(items["brand"][seed_item])
    model = items["model"][seed_item]
    intent = {"kind": "type", "types": [t], "brand": -1, "color": -1, "size": -1, "material": -1, "family": -1}
    surface = name.lower() if rng.random() < 0.5 else synonyms[int(rng.integers(len(synonyms)))]
    if surface in _SYNONYM_TYPES:
        intent["types"] = _SYNONYM_TYPES[surface]
    kinds = ["type", "type_attr", "brand_type", "brand", "model"]
    kind = kinds[int(rng.choice(5, p=[0.25, 0.32, 0.2, 0.08, 0.15]))]
    if kind in ("brand", "brand_type") and brand < 0 or kind == "model" and not model:
        kind = "type_attr"
    intent["kind"] = kind
    if kind == "type":
        text = surface
    elif kind == "type_attr":
        attrs = [a for a in ("color", "size", "material") if items[a][seed_item] >= 0
                 and not (a == "material" and _MATERIALS[items[a][seed_item]].lower() in surface)]
        if not attrs:
            attrs = ["size"]
        chosen = [attrs[int(i)] for i in rng.permutation(len(attrs))[: int(rng.integers(1, 3))]]
        words = []
        for a in ("size", "color", "material"):
            if a in chosen:
                v = int(items[a][seed_item])
                intent[a] = v
                vocab = {"size": _SIZES, "color": _COLORS, "material": _MATERIALS}[a]
                words.append(_short_size(vocab[v]) if a == "size" else vocab[v].lower())
        text = " ".join(words + [surface]) if rng.random() < 0.7 else " ".join([surface] + words)
    elif kind == "brand_type":
        intent["brand"] = brand
        text = f"{_BRANDS[brand].lower()} {surface}"
    elif kind == "brand":
        intent["brand"] = brand
        text = _BRANDS[brand].lower()
    else:
        intent["family"] = int(items["family"][seed_item])
        intent["brand"] = brand
        intent["types"] = [t]
        form = int(rng.integers(3))
        text = [model.lower(), f"{_BRANDS[brand].lower() if brand >= 0 else surface} {model.lower()}",
                f"{surface} {model}"][form]
    if kind != "model" and rng.random() < 0.08:
        text = _misspell(text, rng)
    return text, intent


def _grade(intent: dict, items: dict) -> np.ndarray:
    """Relevance of every item to ``intent``, in thirds (3 = irrelevant ... 9 = exact)."""
    same_type = np.isin(items["type"], intent["types"])
    cats = [_CATEGORIES.index(_TYPES[t][1]) for t in intent["types"]]
    same_cat = np.isin(items["category"], cats)
    if intent["kind"] == "brand":
        return np.where(items["brand"] == intent["brand"], 9, 3)
    if intent["kind"] == "model":
        g = np.where(same_cat, 4, 3)
        g = np.where(same_type, 6, g)
        g = np.where(same_type & (items["brand"] == intent["brand"]), 7, g)
        return np.where(items["family"] == intent["family"], 9, g)
    penalty = np.zeros(len(same_type), dtype=np.int64)
    shared = np.zeros(len(same_type), dtype=bool)
    for attr, weight in (("brand", 2), ("color", 1), ("size", 1), ("material", 1)):
        if intent[attr] >= 0:
            penalty += weight * (items[attr] != intent[attr])
            if attr in ("brand", "color"):
                shared |= items[attr] == intent[attr]
    related = np.where(same_cat, 4 + shared, 3)
    return np.where(same_type, np.maximum(9 - penalty, 6), related)


def generate_demo_data(folder: Path, *, n_items: int = 3000, n_queries: int = 400, seed: int = 0) -> dict[str, Path]:
    """Write ``catalog``, ``queries`` and ``judgments`` Parquet files into ``folder``.

    The same ``seed`` and sizes give byte-identical files. Returns the three paths by name.
    """
    if n_items < 10 or n_queries < 1:
        raise ValueError(f"generate_demo_data needs n_items >= 10 and n_queries >= 1; got {n_items} and {n_queries}")
    rng = np.random.default_rng(seed)
    items = _catalog(rng, n_items)
    item_ids = np.arange(100001, 100001 + n_items, dtype=np.int64)

    texts: list[str] = []
    intents: list[dict] = []
    seen: set[str] = set()
    pop = items["popularity"] / items["popularity"].sum()
    for _ in range(50 * n_queries):
        if len(texts) == n_queries:
            break
        text, intent = _query(rng, items, int(rng.choice(n_items, p=pop)))
        if text not in seen:
            seen.add(text)
            texts.append(text)
            intents.append(intent)
    if len(texts) < n_queries:
        raise ValueError(f"could only make {len(texts)} distinct queries from {n_items} items")

    j_query, j_item, j_rel = [], [], []
    for qi, intent in enumerate(intents):
        grades = _grade(intent, items)
        # within a grade, popular items are more likely judged: raters grade what the engine showed
        shown = items["popularity"]
        best = np.flatnonzero(grades == grades.max())
        anchor = int(rng.choice(best, p=shown[best] / shown[best].sum()))
        p = _GRADE_WEIGHT[grades] * shown / np.bincount(grades, weights=shown, minlength=10)[grades]
        p[anchor] = 0.0
        n_judged = min(int(rng.integers(5, 11)), n_items)
        others = rng.choice(n_items, n_judged - 1, replace=False, p=p / p.sum())
        chosen = np.sort(np.concatenate([[anchor], others]))
        j_query.append(np.full(len(chosen), qi + 1, dtype=np.int64))
        j_item.append(item_ids[chosen])
        j_rel.append(np.round(grades[chosen] / 3.0, 2))

    def names(codes: np.ndarray, vocab: list[str]) -> pa.Array:
        return pa.array([vocab[c] if c >= 0 else None for c in codes], type=pa.string())

    catalog = pa.table({
        "item_id": pa.array(item_ids),
        "title": pa.array(items["title"], type=pa.string()),
        "brand": names(items["brand_shown"], _BRANDS),
        "category": names(items["category"], _CATEGORIES),
        "color": names(items["color"], _COLORS),
        "material": names(items["material"], _MATERIALS),
        "price": pa.array(items["price"]),
        "in_stock": pa.array(items["in_stock"]),
        "popularity": pa.array(items["popularity"]),
    })
    query_ids = np.arange(1, n_queries + 1, dtype=np.int64)
    queries = pa.table({"query_id": pa.array(query_ids), "query": pa.array(texts, type=pa.string())})
    jq = np.concatenate(j_query)
    judgments = pa.table({
        "query_id": pa.array(jq),
        "query": pa.array([texts[q - 1] for q in jq], type=pa.string()),
        "item_id": pa.array(np.concatenate(j_item)),
        "relevance": pa.array(np.concatenate(j_rel)),
    })

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, table in (("catalog", catalog), ("queries", queries), ("judgments", judgments)):
        paths[name] = folder / f"{name}.parquet"
        pq.write_table(table, paths[name])
    return paths
