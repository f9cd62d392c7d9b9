#!/usr/bin/env bash
# The benchmark suite behind benchmarks/results/<date>-<machine>/:
#   demo       the generated demo shop (always), with sweeps and the synthetic ANN comparison;
#   homedepot  the Home Depot example (when ../shared/data and its built artifacts are there).
#
#   benchmarks/run_suite.sh [RESULTS_DIR]          # default: benchmarks/results/<date>-<machine id>
#
# Environment: ANN_SIZE (synthetic vectors, default 200000), HD_QUERIES (Home Depot held-out
# queries used, default 1024; HD_QUERIES_FAST for the bf16 run in batches of 1024, default 2048, i.e.
# all 1,843), REPEATS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results/$(python -c 'from pipeline.bench import fingerprint as f; x = f(); print(x["date"] + "-" + x["id"])')}
ANN_SIZE=${ANN_SIZE:-200000}
HD_QUERIES=${HD_QUERIES:-1024}
HD_QUERIES_FAST=${HD_QUERIES_FAST:-2048}
REPEATS=${REPEATS:-3}
DEMO=${DEMO:-/tmp/funnel-bench-demo}
mkdir -p "$RESULTS"

[ -f "$DEMO/artifacts/ranker/model.txt" ] || funnel demo --workdir "$DEMO" --quiet
funnel bench "$DEMO/pipeline.toml" --queries "$DEMO/artifacts/ranker/holdout_queries.parquet" \
    --judgments "$DEMO/artifacts/ranker/holdout_judgments.parquet" --out "$RESULTS/demo" \
    --repeats "$REPEATS" --sweep --ann-size "$ANN_SIZE" --quiet

HD=examples/homedepot
if [ -d ../shared/data/homedepot ] && [ -f "$HD/artifacts/ranker/model.txt" ]; then
    # dense.toml: dense recall of 100 -> filter -> rank 100 -> top 10, as configured (fp32, batches of 256)
    funnel bench "$HD/dense.toml" --queries "$HD/artifacts/ranker/holdout_queries.parquet" \
        --judgments "$HD/artifacts/ranker/holdout_judgments.parquet" --top 10 --max-queries "$HD_QUERIES" \
        --out "$RESULTS/homedepot" --repeats "$REPEATS" --sweep --quiet
    # the fast settings: bf16 encoder, compiled (torch.compile), batches of 1024 queries
    funnel bench "$HD/dense.toml" --queries "$HD/artifacts/ranker/holdout_queries.parquet" \
        --judgments "$HD/artifacts/ranker/holdout_judgments.parquet" --top 10 --max-queries "$HD_QUERIES_FAST" \
        --batch-size 1024 --set encode.sentence_transformers.precision=bf16 \
        --set encode.sentence_transformers.batch_size=256 --set encode.sentence_transformers.compile=true \
        --out "$RESULTS/homedepot-bf16" --repeats "$REPEATS" --quiet
else
    echo "Home Depot example not built (../shared/data/homedepot, $HD/artifacts): demo only" >&2
fi
echo "results in $RESULTS"
