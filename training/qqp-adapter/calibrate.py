"""The adapted model's default threshold: the one that matches, on the validation part,
the precision the base model has at its default threshold (0.90), so turning the adapter
on trades nothing in precision and the gain shows as recall. Uses only the validation
part of train.py's split (never qqp-dev, the report set).

Run: python calibrate.py --adapter ../../models/adapters/qqp-lora-r8.safetensors
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from check_chat import merged  # noqa: E402
from train import embed, groups_and_parts  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def judged(model, tok, pairs, root):
    """(similarity of b's nearest a, +1 correct / -1 wrong) under the cache simulation."""
    inserts = list(dict.fromkeys(p["a"] for p in pairs))
    sims = embed(model, tok, [p["b"] for p in pairs]) @ embed(model, tok, inserts).t()
    best, idx = sims.max(1)
    different = set()
    for p in pairs:
        if not p["duplicate"]:
            different |= {(root(p["a"]), root(p["b"])), (root(p["b"]), root(p["a"]))}
    out = []
    for p, s, j in zip(pairs, best.tolist(), idx.tolist()):
        rq, re_ = root(p["b"]), root(inserts[j])
        if p["b"] == inserts[j] or rq == re_:
            out.append((s, 1))
        elif (rq, re_) in different:
            out.append((s, -1))
    return out, sum(p["duplicate"] for p in pairs)


def at(hits, t):
    c = sum(1 for s, v in hits if s >= t and v == 1)
    w = sum(1 for s, v in hits if s >= t and v == -1)
    return c / max(1, c + w), c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--pairs", default="../shared/data/qqp-train.json")
    ap.add_argument("--report-pairs", default="../shared/data/qqp-dev.json")
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/semcache/models/sentence-transformers--all-MiniLM-L6-v2"))
    ap.add_argument("--base-threshold", type=float, default=0.90)
    args = ap.parse_args()
    torch.set_num_threads(2)
    pairs = json.load(open(args.pairs))
    root, part = groups_and_parts(pairs, json.load(open(args.report_pairs)))
    val = [p for p in pairs if part(p) == "validate"]
    tok = AutoTokenizer.from_pretrained(args.model)
    base, dups = judged(merged(args.model, None), tok, val, root)
    target, base_correct = at(base, args.base_threshold)
    adapted, _ = judged(merged(args.model, args.adapter), tok, val, root)
    print(f"validation: {len(val)} pairs, {dups} duplicates")
    print(f"base at {args.base_threshold:.2f}: precision {target:.4f}, recall {base_correct / dups:.4f}")
    for t in [x / 1000 for x in range(900, 991, 5)]:
        p, c = at(adapted, t)
        mark = ""
        if p >= target and not getattr(main, "done", False):
            main.done = True
            mark = "  <- first at or above the base precision"
        print(f"adapted at {t:.3f}: precision {p:.4f}, recall {c / dups:.4f}{mark}")


if __name__ == "__main__":
    main()
