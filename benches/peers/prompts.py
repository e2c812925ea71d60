"""Writes the prompts that ../shared/bench-peers measures its peers on, so that our
benchmarks (`cargo bench --bench embed_protocol`, `--bench ann`, `--bench load`) read
exactly the same texts. Run with the harness's own venv, from anywhere:

    /tmp/bench-peers/.venv/bin/python benches/peers/prompts.py /tmp/bench-peers target/bench-prompts.json
"""
import json
import sys
from pathlib import Path

harness, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
sys.path.insert(0, str(harness))
import bench_common as bc  # noqa: E402
import embed_bench as eb  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

split = bc.prompt_split()
corpus = [p for p, _ in split["corpus"]]
tok = Tokenizer.from_file(str(bc.MODEL_DIR / "tokenizer.json"))
tok.no_truncation()
tok.no_padding()
doc = {
    # embed_bench.py: the first 300 corpus prompts one by one, the next 2000 in batches of 32
    "single": corpus[:300],
    "batch": corpus[300:2300],
    "fixed": {str(n): eb.fixed_length_text(tok, n) for n in eb.FIXED_LENS},
    # the ANN and end-to-end benchmarks: the whole corpus and the held-out queries
    "corpus": corpus,
    "queries": [p for p, _ in split["queries"]],
    # gptcache_bench.py stores the first 1,000 corpus pairs and the mock 'origin' prompts
    "stored": [[p, a] for p, a in split["corpus"] if a.strip()][:1000],
    "mock": [list(pair) for pair in bc.load_mock_pairs()] if bc.MOCK_DATA_JSON.exists() else [],
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(doc))
print(f"wrote {out}: {len(corpus)} corpus prompts, {len(doc['queries'])} queries")
