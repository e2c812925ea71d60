#!/usr/bin/env bash
# Runs the peers' harness (../shared/bench-peers) and our benchmarks back to back on this
# machine, so every figure in BENCHMARKS.md has its peer from the same run.
#
#   benches/peers/run.sh [embed] [ann] [load]      (default: all three)
#
# BENCH_PEERS: where the harness is copied to and run (default /tmp/bench-peers; it
# installs its own venv with torch, onnxruntime, hnswlib, faiss, usearch and gptcache).
# Outputs: the harness's results/*.md and target/bench-run/*.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
HARNESS="${BENCH_PEERS:-/tmp/bench-peers}"
SHARED="${SEMCACHE_SHARED:-../shared}"
OUT=target/bench-run
mkdir -p "$OUT"
[ -d "$HARNESS" ] || cp -r "$SHARED/bench-peers" "$HARNESS"
[ -x "$HARNESS/.venv/bin/python" ] && [ -f "$HARNESS/data/mock_data.json" ] ||
  (cd "$HARNESS" && MOCK_DATA_JSON="$(realpath "$SHARED/data/gptcache-mock-pairs.json")" ./setup.sh)
PY="$HARNESS/.venv/bin/python"
"$PY" benches/peers/prompts.py "$HARNESS" target/bench-prompts.json
export SEMCACHE_BENCH_PROMPTS=target/bench-prompts.json SEMCACHE_BENCH_DATA="$HARNESS/data"
date -u +"run started %Y-%m-%d %H:%M UTC" | tee "$OUT/when.txt"

for what in ${@:-embed ann load}; do
  case "$what" in
    embed)
      (cd "$HARNESS" && "$PY" embed_bench.py) > "$OUT/peers-embed.log" 2>&1
      cargo bench --bench embed_protocol | tee "$OUT/semcache-embed.txt"
      ;;
    ann)
      [ -f "$HARNESS/data/vectors.npy" ] || (cd "$HARNESS" && "$PY" embed_corpus.py)
      (cd "$HARNESS" && "$PY" ann_bench.py) > "$OUT/peers-ann.log" 2>&1
      cargo bench --bench ann | tee "$OUT/semcache-ann.txt"
      ;;
    load)
      (cd "$HARNESS" && "$PY" gptcache_bench.py) > "$OUT/peers-gptcache.log" 2>&1
      cargo bench --bench load | tee "$OUT/semcache-load.txt"
      ;;
    *) echo "unknown benchmark $what (embed, ann, load)" >&2; exit 2 ;;
  esac
done
echo "peers' tables: $HARNESS/results/{embed,ann,gptcache}.md; ours: $OUT/"
