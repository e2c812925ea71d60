"""Does the QQP adapter keep what the base model gets right on chat prompts?

On ShareGPT first turns (the chat-prompt corpus of ../shared/bench-peers, split by its
bench_common.prompt_split), compares the base model with the adapted one (weights merged
as the service merges them):
  - a rewording of each held-out query (case, punctuation, a polite prefix) is added to
    the corpus: is it still the query's nearest neighbour, above each model's threshold?
  - the nearest *other* prompt of each query: how often do the two models agree on it,
    and how often is it above the threshold (a hit on a different chat prompt)?
Run: BENCH_DATA=/path/to/bench-peers/data python check_chat.py --adapter ../../models/adapters/qqp-lora-r8.safetensors
"""

import argparse
import os
import random
import re
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, os.environ.get("BENCH_PEERS", "../shared/bench-peers"))
import bench_common as bc  # noqa: E402


def merged(model_dir, adapter):
    model = AutoModel.from_pretrained(model_dir)
    if adapter:
        with safe_open(adapter, "pt") as f:
            meta = f.metadata()
            scale = float(meta["alpha"]) / float(meta["rank"])
            params = dict(model.named_parameters())
            for key in f.keys():
                if key.endswith(".lora_a"):
                    layer = key[: -len(".lora_a")]
                    a, b = f.get_tensor(key), f.get_tensor(layer + ".lora_b")
                    with torch.no_grad():
                        params[layer + ".weight"] += scale * (b @ a)
    return model.eval()


def embed(model, tok, texts, batch=32):
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    with torch.no_grad():
        for s in range(0, len(order), batch):
            ids = order[s:s + batch]
            enc = tok([texts[i] for i in ids], padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            v = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
            for i, row in zip(ids, v):
                out[i] = row
    return torch.stack(out)


def reword(text, rng):
    t = text.lower() if rng.random() < 0.5 else text
    t = re.sub(r"[?.!]+\s*$", "", t)
    return rng.choice(["Please: ", "Hi! ", "Can you help? ", ""]) + t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/semcache/models/sentence-transformers--all-MiniLM-L6-v2"))
    ap.add_argument("--corpus", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--thresholds", default="0.90,0.94", help="base,adapted")
    args = ap.parse_args()
    torch.set_num_threads(2)
    split = bc.prompt_split()
    corpus = [p for p, _ in split["corpus"][: args.corpus]]
    queries = [p for p, _ in split["queries"][: args.queries]]
    rng = random.Random(7)
    rewordings = [reword(q, rng) for q in queries]
    tok = AutoTokenizer.from_pretrained(args.model)
    base_t, adapted_t = (float(x) for x in args.thresholds.split(","))
    nearest = {}
    for name, adapter, threshold in (("base", None, base_t), ("adapted", args.adapter, adapted_t)):
        model = merged(args.model, adapter)
        c = embed(model, tok, corpus)
        q = embed(model, tok, queries)
        r = embed(model, tok, rewordings)
        # The rewording among the corpus: found as the query's nearest, above the threshold?
        own = (q * r).sum(-1)
        other = (q @ c.t()).max(1)
        found = ((own > other.values) & (own >= threshold)).float().mean().item()
        nearest[name] = other.indices
        above = (other.values >= threshold).float().mean().item()
        print(f"{name} (threshold {threshold:.2f}): rewording found {found:.3f}; "
              f"nearest other prompt above the threshold for {above:.3f} of queries; "
              f"median similarity of the rewording {own.median().item():.3f}, "
              f"of the nearest other {other.values.median().item():.3f}", flush=True)
    agree = (nearest["base"] == nearest["adapted"]).float().mean().item()
    print(f"nearest other prompt the same in both models for {agree:.3f} of {len(queries)} queries "
          f"({len(corpus)} corpus prompts)")


if __name__ == "__main__":
    main()
