"""Trains semcache's QQP adapter: LoRA (rank 8) on every dense layer of all-MiniLM-L6-v2.

Seeded and deterministic on one machine. Trains on qqp-train.json less
everything connected to qqp-dev.json (the set `semcache eval` reports on, never seen
here); a validation part (precision at recall 0.60 under the cache-simulation protocol)
picks the epoch.

Loss: CoSENT over every labelled pair in a batch (duplicates must score above the
non-duplicates, which in Quora are near-misses on the same topic: the wrong hits a cache
serves), plus in-batch multiple-negatives ranking on the duplicates (the batch's other
questions as negatives, same-group ones masked).

Writes adapter.safetensors (lora_a [r, in], lora_b [out, r] per layer; the service
merges W += alpha/r · B·A at load) and reference vectors of the parity texts.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense", "intermediate.dense", "output.dense")


class LoRA(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.a = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.a.t() @ self.b.t()) * self.scale


def add_lora(model, rank, alpha):
    adapted = {}
    for i, layer in enumerate(model.encoder.layer):
        for name in TARGETS:
            parent = layer
            *path, leaf = name.split(".")
            for p in path:
                parent = getattr(parent, p)
            lora = LoRA(getattr(parent, leaf), rank, alpha)
            setattr(parent, leaf, lora)
            adapted[f"encoder.layer.{i}.{name}"] = lora
    return adapted


def groups_and_parts(pairs, report_pairs):
    """Duplicate groups (a union-find over the duplicate labels) and the split.

    The report set is qqp-dev.json (what `semcache eval` reports on): every pair of
    qqp-train.json in a connected component (over all labelled pairs) that touches it is
    left out, so no question of the report set, nor any question labelled against one,
    is trained on. Of the rest, components whose smallest text hashes below 37/256
    validate (pick the epoch); the remainder trains.
    """
    def finder():
        parent = {}

        def root(t):
            while t in parent:
                t = parent[t]
            return t

        return parent, root

    dup_parent, root = finder()
    all_parent, comp = finder()
    for p in pairs:
        for parent, r, linked in ((dup_parent, root, p["duplicate"]), (all_parent, comp, True)):
            if linked:
                ra, rb = r(p["a"]), r(p["b"])
                if ra != rb:
                    parent[ra] = rb
    reported = {comp(t) for p in report_pairs for t in (p["a"], p["b"])}
    smallest = {}
    for p in pairs:
        c = comp(p["a"])
        smallest[c] = min(smallest.get(c, p["a"]), p["a"], p["b"])

    def part(p):
        c = comp(p["a"])
        if c in reported:
            return "report"
        return "validate" if hashlib.sha256(smallest[c].encode()).digest()[0] < 37 else "train"

    return root, part


def embed(model, tok, texts, batch=128, max_len=128):
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
            out.append(pool(model(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.cat(out)


def pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def precision_at_recall(model, tok, pairs, root, target=0.60):
    """Cache simulation: insert every a, search every b; the nearest a decides."""
    inserts = list(dict.fromkeys(p["a"] for p in pairs))
    ins = embed(model, tok, inserts)
    qs = embed(model, tok, [p["b"] for p in pairs])
    sims = qs @ ins.t()
    best, idx = sims.max(1)
    different = set()
    for p in pairs:
        if not p["duplicate"]:
            ra, rb = root(p["a"]), root(p["b"])
            different.add((ra, rb))
            different.add((rb, ra))
    duplicates = sum(p["duplicate"] for p in pairs)
    judged = []
    for p, s, j in zip(pairs, best.tolist(), idx.tolist()):
        e = inserts[j]
        rq, re_ = root(p["b"]), root(e)
        if p["b"] == e or rq == re_:
            judged.append((s, 1))
        elif (rq, re_) in different:
            judged.append((s, -1))
    judged.sort(key=lambda x: -x[0])
    correct = wrong = 0
    for s, v in judged:
        correct += v == 1
        wrong += v == -1
        if correct >= target * duplicates:
            return correct / (correct + wrong), s
    return float("nan"), float("nan")


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    # The pairs it trains and validates on: qqp-train.json less everything connected to
    # qqp-dev.json (pairs.json.gz here, written by --export-pairs; the split is the same
    # whichever of the two is given).
    ap.add_argument("--pairs", default="training/qqp-adapter/pairs.json.gz")
    ap.add_argument("--export-pairs", help="write the train and validation pairs there, then stop")
    ap.add_argument("--report-pairs", default="../shared/data/qqp-dev.json")
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/semcache/models/sentence-transformers--all-MiniLM-L6-v2"))
    ap.add_argument("--parity", default="tests/fixtures/minilm-reference.json")
    ap.add_argument("--out", default="models/adapters")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--scale", type=float, default=20.0)
    ap.add_argument("--mnrl", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="train on the first N pairs only")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    pairs = load(args.pairs)
    report_pairs = load(args.report_pairs) if os.path.exists(args.report_pairs) else []
    root, part = groups_and_parts(pairs, report_pairs)
    train = [p for p in pairs if part(p) == "train"]
    val = [p for p in pairs if part(p) == "validate"]
    report = [p for p in pairs if part(p) == "report"]  # qqp-dev and what links to it
    if args.export_pairs:
        kept = [p for p in pairs if part(p) != "report"]
        with gzip.open(args.export_pairs, "wt") as f:
            json.dump(kept, f, ensure_ascii=False)
        print(f"wrote {len(kept)} pairs to {args.export_pairs}")
        return
    if args.limit:
        train = train[:args.limit]
    print(f"{len(pairs)} pairs: train {len(train)} ({sum(p['duplicate'] for p in train)} duplicates), "
          f"validation {len(val)} ({sum(p['duplicate'] for p in val)}), report {len(report)} (unused here)",
          flush=True)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    p0, t0 = precision_at_recall(model, tok, val, root)
    print(f"base: validation precision at recall 0.60 = {p0:.4f} (threshold {t0:.4f})", flush=True)
    adapted = add_lora(model, args.rank, args.alpha)
    params = [q for l in adapted.values() for q in (l.a, l.b)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * math.ceil(len(train) / args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.05 * steps)) * max(0.0, (steps - s) / steps))
    gid = {}
    group_of = lambda t: gid.setdefault(root(t), len(gid))
    best = (p0, -1, None)
    step = 0
    started = time.time()
    for epoch in range(args.epochs):
        rng = random.Random(args.seed + epoch)
        order = list(range(len(train)))
        rng.shuffle(order)
        # Batches of similar length (sorted within windows of 16 batches, then shuffled):
        # padding to a batch's longest question otherwise doubles the cost of a step.
        window = 16 * args.batch
        batches = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda j: len(train[j]["a"]) + len(train[j]["b"]))
            batches += [chunk[i:i + args.batch] for i in range(0, len(chunk), args.batch)]
        rng.shuffle(batches)
        model.train()
        for ids in batches:
            batch = [train[j] for j in ids]
            texts = [p["a"] for p in batch] + [p["b"] for p in batch]
            enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
            v = pool(model(**enc).last_hidden_state, enc["attention_mask"])
            n = len(batch)
            va, vb = v[:n], v[n:]
            cos = (va * vb).sum(-1) * args.scale
            label = torch.tensor([p["duplicate"] for p in batch], dtype=torch.bool)
            # CoSENT: log(1 + Σ exp(s_neg − s_pos)) over (neg, pos) pairs.
            diff = cos[None, :] - cos[:, None]  # [i, j] = s_j − s_i
            mask = label[:, None] & ~label[None, :]  # i positive, j negative
            loss = torch.logsumexp(torch.cat([torch.zeros(1), diff[mask]]), 0)
            if args.mnrl and label.any():
                g = torch.tensor([group_of(t) for t in texts])
                pos = label.nonzero().squeeze(1)
                logits = (va[pos] @ v.t()) * args.scale
                same = g[pos][:, None] == g[None, :]
                target = pos + n
                same[torch.arange(len(pos)), target] = False
                same[torch.arange(len(pos)), pos] = True  # itself
                logits = logits.masked_fill(same, float("-inf"))
                loss = loss + args.mnrl * F.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 10 == 0:
                el = time.time() - started
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f} "
                      f"{el:.0f}s ({el / step:.2f}s/step)", flush=True)
        pv, tv = precision_at_recall(model, tok, val, root)
        print(f"epoch {epoch}: validation precision at recall 0.60 = {pv:.4f} (threshold {tv:.4f})",
              flush=True)
        if pv > best[0]:
            best = (pv, epoch, {k: (l.a.detach().clone(), l.b.detach().clone())
                                for k, l in adapted.items()})
    print(f"best epoch {best[1]}: {best[0]:.4f} (base {p0:.4f})", flush=True)
    if best[2] is None:
        print("no epoch beat the base model; nothing written")
        return
    os.makedirs(args.out, exist_ok=True)
    tensors = {}
    for k, (a, b) in best[2].items():
        tensors[f"{k}.lora_a"] = a.contiguous()
        tensors[f"{k}.lora_b"] = b.contiguous()
        adapted[k].a.data.copy_(a)
        adapted[k].b.data.copy_(b)
    meta = {"rank": str(args.rank), "alpha": str(args.alpha), "base": "sentence-transformers/all-MiniLM-L6-v2",
            "seed": str(args.seed), "epoch": str(best[1]), "validation_precision_at_recall_0.60": f"{best[0]:.4f}",
            "base_validation_precision": f"{p0:.4f}"}
    path = os.path.join(args.out, "qqp-lora-r8.safetensors")
    save_file(tensors, path, metadata=meta)
    print(f"wrote {path}: sha256 {hashlib.sha256(open(path, 'rb').read()).hexdigest()}")
    # Reference vectors for the parity test, from the adapted model as trained.
    parity = json.load(open(args.parity))
    texts = [item["text"] for item in parity["items"]]
    model.eval()
    vecs = []
    with torch.no_grad():
        for t in texts:
            enc = tok([t], truncation=True, max_length=256, return_tensors="pt")
            vecs.append(pool(model(**enc).last_hidden_state, enc["attention_mask"])[0].tolist())
    ref = os.path.join(args.out, "qqp-lora-r8.reference.json")
    json.dump({"adapter": os.path.basename(path), "texts": texts, "vectors": vecs}, open(ref, "w"))
    print(f"wrote {ref}")


if __name__ == "__main__":
    main()
