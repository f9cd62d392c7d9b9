"""Column names shared by the built-in stages, in one place.

Queries enter a pipeline one row per query (``query_id`` plus ``query`` text or a user
``history``); from recall on, batches are in *long form*: one row per (query, candidate item).
"""

QUERY_ID = "query_id"
QUERY = "query"
HISTORY = "history"
QUERY_EMBEDDING = "query_embedding"

ITEM_ID = "item_id"
SCORE = "score"
RANK = "rank"
SOURCE = "source"

RECALL_SCORE = "recall_score"
RECALL_RANK = "recall_rank"

RELEVANCE = "relevance"
