"""Drives semcache's Qdrant-compatible REST subset with the official qdrant-client (1.20.0).

Usage:
    python check_collections.py BASE_URL ADMIN_KEY READER_KEY WRITER_KEY [--phase all|write|verify]

A key of "-" means auth is off (give "-" for all three); the auth checks are then skipped.
  --phase all     (default) every check below, on its own qc_* collections, deleted afterwards
  --phase write   (re)creates the "persist" collection: 2000 seeded points with payloads
  --phase verify  checks "persist" still holds exactly those points (run after a restart)
Prints "all checks passed" and exits 0, or exits 1 at the first failure, naming it.

Filter semantics assumed (Qdrant's): is_empty matches a key that is missing, null or [];
is_null only a key that is present and null; must_not matches points lacking the key.
"""
import argparse
import http.client
import importlib.metadata
import json
import random
import sys
import time
import traceback
import urllib.error
import urllib.request
import uuid
import warnings
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.common.version_check import is_compatible
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384
K = 10
MIN_RECALL = 0.95
VEC_TOL = 1e-2     # the server may keep f16 copies; returned vectors within this of what we sent
SCORE_TOL = 2e-3   # returned scores within this of the brute-force cosine (f16 errs by < 1e-4)
TIE_TOL = 2e-4     # a hit scoring this close to the true k-th best counts as correct (ties, f16)
N_QUERIES = 100
BATCH = 256
TAGS = ["red", "green", "blue", "amber", "violet"]
FOUR_XX = range(400, 500)
PERSIST, PERSIST_SEED, PERSIST_N = "persist", 4242, 2000
MAIN, MIXED, DOCS, BAD, AUTH, TMP = "qc_main", "qc_mixed", "qc_docs", "qc_bad", "qc_auth", "qc_tmp"
MISSING = "qc_does_not_exist"
MINILM, MINILM_Q = "qc_minilm", "qc_minilm_queries"

warnings.filterwarnings("ignore", message="Api key is used with an insecure connection")


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


# --------------------------------------------------------------------------- server access

class Server:
    """The server under test: base URL, keys (None when auth is off) and one client per role."""

    def __init__(self, base, admin, reader, writer):
        self.base = base.rstrip("/")
        self.auth = admin is not None
        self.keys = {"admin": admin, "reader": reader, "writer": writer}
        self.admin = self.client(admin)
        self.reader = self.client(reader)
        self.writer = self.client(writer)

    def client(self, key, **kwargs):
        # port=None: a URL without a port means the scheme's port, not Qdrant's 6333.
        return QdrantClient(url=self.base, port=None, api_key=key, prefer_grpc=False,
                            timeout=120, check_compatibility=False, **kwargs)

    def raw(self, method, path, body=None, key="admin", headers=None, data=None):
        """One plain HTTP request; `key` is a role name, a literal key, or None for no key.
        Returns (status, parsed JSON or text)."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        key = self.keys.get(key, key)
        if key is not None and self.auth:
            hdrs["api-key"] = key
        if body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def send_big(self, path, data):
        """PUT a large body; the server may answer (413) before reading it all and close.
        Returns the status, or None if the connection closed without a readable answer."""
        u = urlsplit(self.base + path)
        conn_class = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_class(u.hostname, u.port, timeout=120)
        hdrs = {"Content-Type": "application/json"}
        if self.auth:
            hdrs["api-key"] = self.keys["admin"]
        try:
            try:
                conn.request("PUT", u.path + (f"?{u.query}" if u.query else ""), body=data, headers=hdrs)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return conn.getresponse().status
        except (ConnectionError, http.client.HTTPException):
            return None
        finally:
            conn.close()


def expect_status(fn, what, statuses=FOUR_XX):
    """Call fn(); it must fail with an HTTP status in `statuses` (client raise or raw status)."""
    try:
        result = fn()
    except UnexpectedResponse as e:
        check(e.status_code in statuses,
              f"{what}: expected HTTP {describe(statuses)}, got {e.status_code}: {e.content[:200]!r}")
        return e
    if isinstance(result, tuple) and isinstance(result[0], int):  # a Server.raw answer
        check(result[0] in statuses,
              f"{what}: expected HTTP {describe(statuses)}, got {result[0]}: {str(result[1])[:200]}")
        return result
    raise CheckFailed(f"{what}: expected HTTP {describe(statuses)}, but the call succeeded")


def describe(statuses):
    return "4xx" if statuses == FOUR_XX else "/".join(map(str, statuses))


def healthz_ok(srv):
    status, body = srv.raw("GET", "/healthz")
    check(status == 200, f"GET /healthz answered {status}: {body}")


def completed(result, what):
    check(result.status == models.UpdateStatus.COMPLETED,
          f"{what}: with wait=True the status should be 'completed', got {result.status}")


def fresh_collection(client, name, size=DIM):
    if client.collection_exists(name):
        client.delete_collection(name)
    check(client.create_collection(name, vectors_config=models.VectorParams(
        size=size, distance=models.Distance.COSINE)) is True, f"create_collection({name}) not true")


# --------------------------------------------------------------------------- data

def norm_id(pid):
    """Point ids as the test compares them: ints stay ints, UUIDs become canonical strings."""
    return pid if isinstance(pid, int) else str(uuid.UUID(str(pid)))


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def make_payload(i, cluster, rnd):
    p = {"cluster": int(cluster), "tag": rnd.choice(TAGS), "n": round(rnd.random(), 6),
         "nested": {"k": f"k{rnd.randrange(8)}"}}
    if i % 3 == 0:
        p["opt"] = None           # present and null
    elif i % 3 == 1:
        p["opt"] = f"v{i % 4}"    # (i % 3 == 2: missing)
    if i % 4 == 0:
        p["lst"] = []
    elif i % 4 == 1:
        p["lst"] = ["a", "b"]
    return p


class Dataset:
    """Seeded clustered unit vectors with payloads, and the brute-force truth for them."""

    def __init__(self, seed, n, clusters=20, id_kind="int", spread=0.04):
        rng = np.random.default_rng(seed)
        rnd = random.Random(seed)
        self.spread = spread
        self.centers = unit(rng.standard_normal((clusters, DIM)))
        labels = rng.integers(0, clusters, n)
        # 6 decimals keep a 256-point batch near 1 MB of JSON (full float reprs double that).
        self.vecs = np.round(unit(self.centers[labels] + spread * rng.standard_normal((n, DIM))), 6)
        if id_kind == "int":
            self.ids = list(range(n))
        else:  # mixed: even rows unsigned ints (up to u64::MAX), odd rows UUIDs
            self.ids = [rnd.randrange(2**64) if i % 2 == 0 else str(uuid.UUID(int=rnd.getrandbits(128), version=4))
                        for i in range(n)]
            self.ids[0] = 2**64 - 1
        self.payloads = [make_payload(i, c, rnd) for i, c in enumerate(labels)]
        self.row = {pid: r for r, pid in enumerate(self.ids)}
        self.alive = np.ones(n, dtype=bool)

    def queries(self, count=N_QUERIES, seed=7):
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(self.centers), count)
        return unit(self.centers[picks] + self.spread * rng.standard_normal((count, DIM)))

    def mask(self, pred):
        return self.alive & np.array([pred(pid, p) for pid, p in zip(self.ids, self.payloads)])

    def scores(self, q):
        """Cosine similarity of q to every stored vector."""
        return unit(self.vecs) @ unit(q)

    def alive_ids(self, mask=None):
        m = self.alive if mask is None else mask
        return {self.ids[r] for r in np.flatnonzero(m)}

    def upsert(self, client, name, rows=None):
        """Upserts rows in batches of BATCH, alternating a PointStruct list and a Batch."""
        rows = list(range(len(self.ids))) if rows is None else rows
        for b, start in enumerate(range(0, len(rows), BATCH)):
            chunk = rows[start:start + BATCH]
            if b % 2 == 0:
                points = [models.PointStruct(id=self.ids[r], vector=self.vecs[r].tolist(),
                                             payload=self.payloads[r]) for r in chunk]
            else:
                points = models.Batch(ids=[self.ids[r] for r in chunk],
                                      vectors=self.vecs[chunk].tolist(),
                                      payloads=[self.payloads[r] for r in chunk])
            completed(client.upsert(name, points=points, wait=True), f"upsert batch {b} into {name}")


def fc(key, **kwargs):
    return models.FieldCondition(key=key, **kwargs)


def filter_cases(ds):
    """(label, Filter, Python predicate over (id, payload)) — the same condition twice."""
    some_ids = [ds.ids[r] for r in np.random.default_rng(3).choice(len(ds.ids), 60, replace=False)]
    some_set = set(some_ids)
    V = models.MatchValue
    return [
        ("no filter", None, lambda i, p: True),
        ("cluster == 7 (~5%)", models.Filter(must=[fc("cluster", match=V(value=7))]),
         lambda i, p: p["cluster"] == 7),
        ("must_not tag == red (~80%)", models.Filter(must_not=[fc("tag", match=V(value="red"))]),
         lambda i, p: p.get("tag") != "red"),
        ("0.2 <= n < 0.5", models.Filter(must=[fc("n", range=models.Range(gte=0.2, lt=0.5))]),
         lambda i, p: 0.2 <= p["n"] < 0.5),
        ("should tag blue | amber", models.Filter(should=[fc("tag", match=V(value="blue")),
                                                          fc("tag", match=V(value="amber"))]),
         lambda i, p: p.get("tag") in ("blue", "amber")),
        ("nested.k == k3", models.Filter(must=[fc("nested.k", match=V(value="k3"))]),
         lambda i, p: p["nested"]["k"] == "k3"),
        ("cluster any [1, 2, 3]", models.Filter(must=[fc("cluster", match=models.MatchAny(any=[1, 2, 3]))]),
         lambda i, p: p["cluster"] in (1, 2, 3)),
        ("tag except [red, green]",
         models.Filter(must=[fc("tag", match=models.MatchExcept(**{"except": ["red", "green"]}))]),
         lambda i, p: p["tag"] not in ("red", "green")),
        ("is_empty lst", models.Filter(must=[models.IsEmptyCondition(is_empty=models.PayloadField(key="lst"))]),
         lambda i, p: p.get("lst") in (None, [])),
        ("is_null opt", models.Filter(must=[models.IsNullCondition(is_null=models.PayloadField(key="opt"))]),
         lambda i, p: "opt" in p and p["opt"] is None),
        ("has_id (60 ids)", models.Filter(must=[models.HasIdCondition(has_id=some_ids)]),
         lambda i, p: i in some_set),
        # tag has a keyword payload index (check_load): these start from its postings.
        ("tag == violet (indexed)", models.Filter(must=[fc("tag", match=V(value="violet"))]),
         lambda i, p: p.get("tag") == "violet"),
        ("tag any [red, blue] & cluster == 2 (indexed)",
         models.Filter(must=[fc("tag", match=models.MatchAny(any=["red", "blue"])), fc("cluster", match=V(value=2))]),
         lambda i, p: p.get("tag") in ("red", "blue") and p["cluster"] == 2),
        ("cluster any [4, 5] & n >= 0.1 & not blue",
         models.Filter(must=[fc("cluster", match=models.MatchAny(any=[4, 5])), fc("n", range=models.Range(gte=0.1))],
                       must_not=[fc("tag", match=V(value="blue"))]),
         lambda i, p: p["cluster"] in (4, 5) and p["n"] >= 0.1 and p["tag"] != "blue"),
    ]


# --------------------------------------------------------------------------- search helpers

def query_and_grade(client, name, ds, q, flt, mask, label, **kwargs):
    """One query_points call; checks every hit is a live, matching point with the right score,
    in descending order. Returns (recall@K with tie tolerance, hits)."""
    hits = client.query_points(name, query=q.tolist(), query_filter=flt, limit=K, **kwargs).points
    scores = ds.scores(q)
    for h in hits:
        r = ds.row.get(norm_id(h.id))
        check(r is not None and ds.alive[r], f"{label}: returned id {h.id}, which is not (or no longer) stored")
        check(mask[r], f"{label}: returned id {h.id} whose payload does not match the filter: {ds.payloads[r]}")
        check(abs(h.score - scores[r]) <= SCORE_TOL,
              f"{label}: id {h.id} scored {h.score:.4f}, brute force says {scores[r]:.4f}")
    check(all(a.score >= b.score for a, b in zip(hits, hits[1:])), f"{label}: hits not sorted by score")
    want = min(K, int(mask.sum()))
    if want == 0:
        check(not hits, f"{label}: nothing matches, yet {len(hits)} hits came back")
        return 1.0, hits
    kth = np.sort(np.where(mask, scores, -np.inf))[::-1][want - 1]
    good = sum(1 for h in hits if scores[ds.row[norm_id(h.id)]] >= kth - TIE_TOL)
    return min(good, want) / want, hits


def mean_recall(client, name, ds, queries, flt, pred, label, **kwargs):
    mask = ds.mask(pred)
    return float(np.mean([query_and_grade(client, name, ds, q, flt, mask, label, **kwargs)[0] for q in queries]))


def assert_recall(client, name, ds, queries, flt, pred, label, minimum=MIN_RECALL, **kwargs):
    recall = mean_recall(client, name, ds, queries, flt, pred, label, **kwargs)
    check(recall >= minimum, f"{label}: mean recall@{K} {recall:.3f} < {minimum}")
    return recall


def same_vector(got, want, what):
    check(got is not None and len(got) == len(want), f"{what}: vector missing or of the wrong size")
    diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want)))
    check(diff <= VEC_TOL, f"{what}: stored vector differs by up to {diff:.4f}")


def scroll_all(client, name, flt=None, with_vectors=False, limit=500):
    """Every point via scroll + next_page_offset; checks page sizes and that no id repeats."""
    seen, offset = {}, None
    for _ in range(10_000):
        points, offset = client.scroll(name, limit=limit, offset=offset, scroll_filter=flt,
                                       with_payload=True, with_vectors=with_vectors)
        check(len(points) <= limit, f"scroll {name}: {len(points)} points on a page of limit {limit}")
        check(offset is None or len(points) == limit,
              f"scroll {name}: a short page ({len(points)}) but next_page_offset={offset!r}")
        for p in points:
            pid = norm_id(p.id)
            check(pid not in seen, f"scroll {name}: id {p.id} returned twice")
            seen[pid] = p
        if offset is None:
            return seen
    raise CheckFailed(f"scroll {name}: next_page_offset never became null")


# --------------------------------------------------------------------------- checks

def check_version(srv):
    """GET / answers like Qdrant's root, so QdrantClient's start-up version check stays quiet."""
    info = srv.admin.info()
    client = importlib.metadata.version("qdrant-client")
    check(is_compatible(client, info.version),
          f"GET / reports version {info.version!r}; qdrant-client {client} warns at start-up unless the "
          "major matches and the minor is within 1")


def check_collections(srv):
    c = srv.admin
    for name in (MAIN, MIXED, DOCS, BAD, AUTH, TMP):
        if c.collection_exists(name):
            c.delete_collection(name)
    fresh_collection(c, TMP)
    check(c.collection_exists(TMP) is True, "collection_exists is false right after create")
    check(c.collection_exists(MISSING) is False, "collection_exists is true for a collection never made")
    info = c.get_collection(TMP)
    check(info.status in (models.CollectionStatus.GREEN, models.CollectionStatus.YELLOW), f"status {info.status}")
    vp = info.config.params.vectors
    check(isinstance(vp, models.VectorParams) and vp.size == DIM and vp.distance == models.Distance.COSINE,
          f"get_collection config.params.vectors is {vp}")
    check(info.points_count in (None, 0), f"a new collection has points_count {info.points_count}")
    names = [d.name for d in c.get_collections().collections]
    check(TMP in names, f"get_collections lacks {TMP}: {names}")
    expect_status(lambda: c.create_collection(TMP, vectors_config=models.VectorParams(size=DIM, distance="Cosine")),
                  "re-creating an existing collection")
    check(c.delete_collection(TMP) is True, "delete_collection not true")
    check(c.collection_exists(TMP) is False, "collection still exists after delete")
    expect_status(lambda: c.get_collection(TMP), "get_collection after delete", statuses=(404,))
    expect_status(lambda: c.create_collection(TMP, vectors_config=models.VectorParams(
        size=DIM, distance=models.Distance.EUCLID)), "create with distance Euclid")
    expect_status(lambda: c.create_collection(TMP, vectors_config=models.VectorParams(
        size=0, distance=models.Distance.COSINE)), "create with size 0")
    check(c.collection_exists(TMP) is False, "a rejected create left a collection behind")
    # Any size is fine for vectors; Documents need the model's size.
    fresh_collection(c, TMP, size=DIM + 1)
    docs = srv.client(srv.keys["writer"], cloud_inference=True)
    expect_status(lambda: docs.upsert(TMP, points=[models.PointStruct(id=1, vector=doc("hello"))]),
                  f"a Document into a collection of size {DIM + 1} (the model gives {DIM})")
    c.delete_collection(TMP)


def check_load(srv, main, mixed):
    """Creates qc_main (int ids) and qc_mixed (u64 + UUID ids) and upserts them."""
    for name, ds in ((MAIN, main), (MIXED, mixed)):
        fresh_collection(srv.admin, name)
        ds.upsert(srv.writer, name)
        n = srv.reader.count(name, exact=True).count
        check(n == len(ds.ids), f"{name}: count {n} after upserting {len(ds.ids)} points")
        pc = srv.reader.get_collection(name).points_count
        check(pc in (None, len(ds.ids)), f"{name}: get_collection points_count {pc}, expected {len(ds.ids)}")
    for field, schema in (("tag", models.PayloadSchemaType.KEYWORD), ("cluster", models.PayloadSchemaType.INTEGER)):
        completed(srv.admin.create_payload_index(MAIN, field_name=field, field_schema=schema, wait=True),
                  f"create_payload_index {field}")


def check_filtered_recall(srv, ds, mixed, queries):
    for label, flt, pred in filter_cases(ds):
        r = assert_recall(srv.reader, MAIN, ds, queries, flt, pred, f"query_points [{label}]", with_payload=False)
        print(f"    recall@{K} {r:.3f}  {label}")
    assert_recall(srv.reader, MIXED, mixed, mixed.queries(20), None, lambda i, p: True, "qc_mixed (u64/UUID ids)")


def check_exact(srv, ds, queries):
    for label, flt, pred in filter_cases(ds)[:3]:
        assert_recall(srv.reader, MAIN, ds, queries, flt, pred, f"exact=True [{label}]", minimum=1.0,
                      with_payload=False, search_params=models.SearchParams(exact=True))
    assert_recall(srv.reader, MAIN, ds, queries, None, lambda i, p: True, "hnsw_ef=256",
                  with_payload=False, search_params=models.SearchParams(hnsw_ef=256, exact=False))


def check_score_threshold(srv, ds, queries):
    for q in queries[:20]:
        s = ds.scores(q)
        thr = float(np.sort(s)[::-1][4])  # the 5th best score
        hits = srv.reader.query_points(MAIN, query=q.tolist(), limit=K, score_threshold=thr).points
        check(hits and all(h.score >= thr for h in hits), f"score_threshold {thr:.4f}: got {[h.score for h in hits]}")
        check(len(hits) <= int((s >= thr - SCORE_TOL).sum()), f"score_threshold {thr:.4f}: {len(hits)} hits, too many")
        top = float(s.max())
        none = srv.reader.query_points(MAIN, query=q.tolist(), limit=K, score_threshold=top + 0.05).points
        check(not none, f"score_threshold above the best score still returned {len(none)} hits")


def check_pagination(srv, ds, queries):
    exact = models.SearchParams(exact=True)
    for label, flt, _ in filter_cases(ds)[:3]:
        for q in queries[:10]:
            full = srv.reader.query_points(MAIN, query=q.tolist(), query_filter=flt, limit=30,
                                           search_params=exact, with_payload=False).points
            pages = []
            for offset in (0, 10, 20):
                pages += srv.reader.query_points(MAIN, query=q.tolist(), query_filter=flt, limit=10, offset=offset,
                                                 search_params=exact, with_payload=False).points
            check([norm_id(p.id) for p in pages] == [norm_id(p.id) for p in full],
                  f"[{label}] pages limit=10 offset=0/10/20 differ from limit=30")
    far = srv.reader.query_points(MAIN, query=queries[0].tolist(), limit=10, offset=len(ds.ids) + 5).points
    check(not far, f"offset past the last point returned {len(far)} hits")


def check_payload_and_vectors(srv, ds, queries):
    for q in queries[:5]:
        for h in srv.reader.query_points(MAIN, query=q.tolist(), limit=K, with_payload=True, with_vectors=True).points:
            r = ds.row[norm_id(h.id)]
            check(h.payload == ds.payloads[r], f"id {h.id}: payload {h.payload} != stored {ds.payloads[r]}")
            same_vector(h.vector, ds.vecs[r], f"query_points with_vectors id {h.id}")
        bare = srv.reader.query_points(MAIN, query=q.tolist(), limit=K, with_payload=False, with_vectors=False)
        for h in bare.points:
            check(not h.payload, f"with_payload=False still returned payload {h.payload}")
            check(h.vector is None, "with_vectors=False still returned a vector")


def check_old_search(srv, ds, queries):
    if not hasattr(srv.reader, "search"):
        print("    skipped: QdrantClient.search() is gone in this qdrant-client (use query_points)")
        return
    hits = srv.reader.search(MAIN, query_vector=queries[0].tolist(), limit=K)
    check(len(hits) == K, f"search() returned {len(hits)} hits")


def check_count(srv, ds):
    for label, flt, pred in filter_cases(ds):
        got = srv.reader.count(MAIN, count_filter=flt, exact=True).count
        want = int(ds.mask(pred).sum())
        check(got == want, f"count [{label}]: server {got}, expected {want}")


def check_retrieve(srv, ds, mixed):
    for name, d in ((MAIN, ds), (MIXED, mixed)):
        rows = list(np.random.default_rng(5).choice(len(d.ids), 20, replace=False))
        ids = [d.ids[r] for r in rows]
        unknown = [10**12 + 7, str(uuid.UUID(int=12345, version=4))]
        got = srv.reader.retrieve(name, ids=ids + unknown, with_payload=True, with_vectors=True)
        check(sorted(map(str, (norm_id(p.id) for p in got))) == sorted(map(str, ids)),
              f"retrieve {name}: asked {len(ids)} stored + 2 unknown ids, got {[p.id for p in got]}")
        for p in got:
            r = d.row[norm_id(p.id)]
            check(p.payload == d.payloads[r], f"retrieve {name} id {p.id}: payload {p.payload}")
            same_vector(p.vector, d.vecs[r], f"retrieve {name} id {p.id}")
        bare = srv.reader.retrieve(name, ids=ids[:3], with_payload=False, with_vectors=False)
        check(all(not p.payload and p.vector is None for p in bare), "retrieve without payload/vectors returned them")
        for pid in ids[:2]:
            status, body = srv.raw("GET", f"/collections/{name}/points/{quote(str(pid), safe='')}", key="reader")
            check(status == 200, f"GET /collections/{name}/points/{pid}: {status} {body}")
            rec = body["result"]
            check(norm_id(rec["id"]) == pid and rec.get("payload") == d.payloads[d.row[pid]],
                  f"GET /collections/{name}/points/{pid} returned {str(rec)[:200]}")
        expect_status(lambda: srv.raw("GET", f"/collections/{name}/points/{unknown[0]}", key="reader"),
                      "GET of an unknown point id", statuses=(404,))


def check_scroll(srv, ds, mixed):
    for name, d in ((MAIN, ds), (MIXED, mixed)):
        seen = scroll_all(srv.reader, name)
        check(set(seen) == d.alive_ids(), f"scroll {name}: saw {len(seen)} ids, {int(d.alive.sum())} stored")
        for pid, p in list(seen.items())[:200]:
            check(p.payload == d.payloads[d.row[pid]], f"scroll {name} id {pid}: payload {p.payload}")
    green = models.Filter(must=[fc("tag", match=models.MatchValue(value="green"))])
    seen = scroll_all(srv.reader, MAIN, flt=green, limit=100)
    want = ds.alive_ids(ds.mask(lambda i, p: p["tag"] == "green"))
    check(set(seen) == want, f"scroll with filter: {len(seen)} ids, expected {len(want)}")


def check_payload_ops(srv, mixed):
    w, r = srv.writer, srv.reader
    a, b, c = mixed.ids[2], mixed.ids[3], mixed.ids[5]  # an int, a UUID, a UUID
    completed(w.set_payload(MIXED, payload={"extra": "yes", "n": 42.5}, points=[a, b], wait=True), "set_payload")
    for pid in (a, b):
        got = r.retrieve(MIXED, ids=[pid])[0].payload
        want = {**mixed.payloads[mixed.row[pid]], "extra": "yes", "n": 42.5}
        check(got == want, f"set_payload merges keys: id {pid} has {got}, expected {want}")
        mixed.payloads[mixed.row[pid]] = want
    flagged = models.Filter(must=[fc("cluster", match=models.MatchValue(value=3))])
    completed(w.set_payload(MIXED, payload={"flag": True}, points=flagged, wait=True), "set_payload by filter")
    n_flag = r.count(MIXED, count_filter=models.Filter(must=[fc("flag", match=models.MatchValue(value=True))])).count
    want_flag = int(mixed.mask(lambda i, p: p["cluster"] == 3).sum())
    check(n_flag == want_flag, f"set_payload by filter flagged {n_flag} points, expected {want_flag}")
    for row in np.flatnonzero(mixed.mask(lambda i, p: p["cluster"] == 3)):
        mixed.payloads[row]["flag"] = True
    completed(w.delete_payload(MIXED, keys=["extra", "tag"], points=[a], wait=True), "delete_payload")
    got = r.retrieve(MIXED, ids=[a])[0].payload
    check("extra" not in got and "tag" not in got and got.get("n") == 42.5,
          f"delete_payload(['extra', 'tag']) left {got}")
    mixed.payloads[mixed.row[a]] = got
    # Overwriting an existing id replaces its vector and its whole payload.
    new_vec = np.round(unit(np.random.default_rng(11).standard_normal(DIM)), 6)
    completed(w.upsert(MIXED, points=[models.PointStruct(id=c, vector=new_vec.tolist(), payload={"replaced": True})],
                       wait=True), "overwrite upsert")
    got = r.retrieve(MIXED, ids=[c], with_vectors=True)[0]
    check(got.payload == {"replaced": True}, f"overwrite upsert kept old payload keys: {got.payload}")
    same_vector(got.vector, new_vec, f"overwritten id {c}")
    top = r.query_points(MIXED, query=new_vec.tolist(), limit=1).points
    check(top and norm_id(top[0].id) == c and top[0].score > 0.99, f"query for the new vector found {top}")
    mixed.vecs[mixed.row[c]], mixed.payloads[mixed.row[c]] = new_vec, {"replaced": True}
    check(r.count(MIXED, exact=True).count == len(mixed.ids), "overwrite upsert changed the count")
    # wait=False: acknowledged now, visible soon (the only place the test polls).
    late = str(uuid.UUID(int=99, version=4))
    res = w.upsert(MIXED, points=[models.PointStruct(id=late, vector=new_vec.tolist())], wait=False)
    check(res.status in (models.UpdateStatus.ACKNOWLEDGED, models.UpdateStatus.COMPLETED), f"wait=False: {res}")
    deadline = time.monotonic() + 10
    while not r.retrieve(MIXED, ids=[late]):
        check(time.monotonic() < deadline, "a wait=False upsert never became visible (10 s)")
        time.sleep(0.1)
    completed(w.delete(MIXED, points_selector=models.PointIdsList(points=[late]), wait=True), "delete late point")


def check_delete(srv, ds, queries):
    w, r = srv.writer, srv.reader
    before = int(ds.alive.sum())
    by_id = [ds.ids[i] for i in np.flatnonzero(ds.mask(lambda i, p: p["cluster"] == 3))[:100]]
    # Qdrant ignores ids it does not hold; one is mixed in.
    completed(w.delete(MAIN, points_selector=models.PointIdsList(points=by_id + [10**9]), wait=True), "delete ids")
    ds.alive[[ds.row[i] for i in by_id]] = False
    check(r.count(MAIN, exact=True).count == before - len(by_id), "count after delete by ids")
    gone = models.Filter(must=[fc("tag", match=models.MatchValue(value="violet")),
                               fc("cluster", match=models.MatchAny(any=[0, 1]))])
    doomed = ds.mask(lambda i, p: p["tag"] == "violet" and p["cluster"] in (0, 1))
    completed(w.delete(MAIN, points_selector=models.FilterSelector(filter=gone), wait=True), "delete by filter")
    ds.alive &= ~doomed
    got = r.count(MAIN, exact=True).count
    check(got == int(ds.alive.sum()), f"count after delete by filter: {got}, expected {int(ds.alive.sum())}")
    check(r.count(MAIN, count_filter=gone).count == 0, "points matching the delete filter still counted")
    check(not r.retrieve(MAIN, ids=by_id[:10]), "retrieve still returns deleted ids")
    check(set(scroll_all(r, MAIN)) == ds.alive_ids(), "scroll after deletes does not match the live ids")
    # query_and_grade fails on any deleted id; recall is against the live points only.
    cluster3 = models.Filter(must=[fc("cluster", match=models.MatchValue(value=3))])
    for label, flt, pred in [("no filter", None, lambda i, p: True),
                             ("cluster == 3", cluster3, lambda i, p: p["cluster"] == 3)]:
        assert_recall(r, MAIN, ds, queries, flt, pred, f"after deletes [{label}]", with_payload=False)
    assert_recall(r, MAIN, ds, queries[:30], None, lambda i, p: True, "after deletes, exact", minimum=1.0,
                  with_payload=False, search_params=models.SearchParams(exact=True))


SENTENCES = [
    "The cat curled up on the warm windowsill and fell asleep.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "She baked a chocolate cake for her daughter's birthday party.",
    "The football team won the championship in the final minute.",
    "Volcanic eruptions can send ash high into the atmosphere.",
    "He repaired the leaking kitchen faucet with a new washer.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Regular exercise improves heart health and reduces stress.",
    "The violinist performed a Bach partita at the concert hall.",
    "Python is a popular programming language for data science.",
    "Heavy snowfall closed the mountain roads overnight.",
    "The museum opened an exhibition of ancient Egyptian artifacts.",
    "Bees are essential pollinators for many flowering plants.",
    "The lawyer presented closing arguments to the jury.",
    "Electric cars are getting cheaper as battery prices drop.",
    "They hiked through the pine forest and camped beside a lake.",
    "The chef seasoned the soup with fresh basil and garlic.",
    "A new smartphone model was released with a larger screen.",
    "The child learned to ride a bicycle without training wheels.",
    "Coral reefs are threatened by rising ocean temperatures.",
]
PARAPHRASES = {
    "A kitten is sleeping in the sunshine by the window.": 0,
    "Share prices dropped when the bank increased interest rates.": 1,
    "A probe reached orbit around the red planet.": 6,
    "A musician played classical violin music on stage.": 8,
    "Warmer seas are damaging coral ecosystems.": 19,
}


def doc(text, model=MODEL):
    return models.Document(text=text, model=model)


def check_documents(srv):
    fresh_collection(srv.admin, DOCS)
    writer = srv.client(srv.keys["writer"], cloud_inference=True)
    reader = srv.client(srv.keys["reader"], cloud_inference=True)
    half = len(SENTENCES) // 2
    completed(writer.upsert(DOCS, points=[models.PointStruct(id=i, vector=doc(s), payload={"text": s})
                                          for i, s in enumerate(SENTENCES[:half])], wait=True), "Document upsert")
    completed(writer.upsert(DOCS, points=models.Batch(
        ids=list(range(half, len(SENTENCES))), vectors=[doc(s) for s in SENTENCES[half:]],
        payloads=[{"text": s} for s in SENTENCES[half:]]), wait=True), "Document upsert (Batch)")
    check(reader.count(DOCS, exact=True).count == len(SENTENCES), "Document upsert: wrong count")
    rec = reader.retrieve(DOCS, ids=[0], with_vectors=True)[0]
    check(rec.vector is not None and len(rec.vector) == DIM, "a Document point's stored vector is not 384-dim")
    for text, want in PARAPHRASES.items():
        hits = reader.query_points(DOCS, query=doc(text), limit=3).points
        check(hits and hits[0].id == want, f"Document query {text!r}: expected id {want} first, got "
                                           f"{[(h.id, round(h.score, 3)) for h in hits]}")
        check(hits[0].payload == {"text": SENTENCES[want]}, f"Document query payload {hits[0].payload}")
    # The same text as a Document query and as its exact sentence should agree.
    same = reader.query_points(DOCS, query=doc(SENTENCES[4]), limit=1).points[0]
    check(same.id == 4 and same.score > 0.99, f"querying a stored sentence verbatim: {same}")
    other = doc("x", "BAAI/bge-small-en-v1.5")
    expect_status(lambda: writer.upsert(DOCS, points=[models.PointStruct(id=99, vector=other)]),
                  "Document upsert with another model")
    expect_status(lambda: reader.query_points(DOCS, query=other),
                  "Document query with another model")
    check(reader.count(DOCS, exact=True).count == len(SENTENCES), "a rejected Document upsert changed the count")


def check_minilm_recall(srv):
    """Recall on real MiniLM embeddings (GPTCache's paraphrase pairs, embedded by the
    server): the originals are the corpus, their paraphrases the queries."""
    path = Path(__file__).resolve().parent.parent / "fixtures" / "gptcache-mock-pairs.json"
    pairs = json.loads(path.read_text())
    writer = srv.client(srv.keys["writer"], cloud_inference=True)
    for name, field in ((MINILM, "origin"), (MINILM_Q, "similar")):
        fresh_collection(srv.admin, name)
        for start in range(0, len(pairs), 128):
            chunk = pairs[start:start + 128]
            completed(writer.upsert(name, points=models.Batch(
                ids=list(range(start, start + len(chunk))),
                vectors=[doc(p[field]) for p in chunk],
                payloads=[{"group": i % 20} for i in range(start, start + len(chunk))]), wait=True),
                f"Document upsert into {name}")
    corpus = list(scroll_all(srv.reader, MINILM, with_vectors=True).values())
    ids = np.array([norm_id(r.id) for r in corpus])
    vectors = np.array([r.vector for r in corpus], dtype=np.float64)
    groups = ids % 20
    queries = list(scroll_all(srv.reader, MINILM_Q, with_vectors=True).values())[:N_QUERIES * 2]
    for label, group in (("no filter", None), ("group == 3 (5%)", 3)):
        recalls, top1 = [], 0
        for q in queries:
            qv = np.array(q.vector)
            scores = vectors @ qv
            if group is not None:
                scores = np.where(groups == group, scores, -np.inf)
            order = np.argsort(-scores)[:K]
            kth = scores[order[-1]]
            flt = None if group is None else models.Filter(must=[fc("group", match=models.MatchValue(value=group))])
            hits = srv.reader.query_points(MINILM, query=q.vector, query_filter=flt, limit=K).points
            good = sum(1 for h in hits if h.score >= kth - TIE_TOL)
            recalls.append(min(good, K) / K)
            top1 += bool(hits) and norm_id(hits[0].id) == norm_id(q.id)
        recall = float(np.mean(recalls))
        print(f"    MiniLM recall@10 {recall:.3f}  {label}  (paraphrase finds its original first: "
              f"{top1}/{len(queries)})")
        check(recall >= MIN_RECALL, f"MiniLM recall@10 {recall:.3f} < {MIN_RECALL} ({label})")
    for name in (MINILM, MINILM_Q):
        srv.admin.delete_collection(name)


def check_bad_inputs(srv):
    c = srv.admin
    fresh_collection(c, BAD)
    good = unit(np.ones(DIM)).tolist()
    expect_status(lambda: c.upsert(BAD, points=[models.PointStruct(id=1, vector=[0.1, 0.2, 0.3])]),
                  "upsert with a 3-dim vector")
    expect_status(lambda: c.upsert(BAD, points=[models.PointStruct(id=1, vector=good),
                                                models.PointStruct(id=2, vector=good[:-1])]),
                  "a batch with one vector of the wrong size")
    expect_status(lambda: c.query_points(BAD, query=[0.1, 0.2, 0.3]), "query with a 3-dim vector")
    for what, call in [
        ("get_collection", lambda: c.get_collection(MISSING)),
        ("upsert", lambda: c.upsert(MISSING, points=[models.PointStruct(id=1, vector=good)])),
        ("query_points", lambda: c.query_points(MISSING, query=good)),
        ("count", lambda: c.count(MISSING)),
        ("scroll", lambda: c.scroll(MISSING)),
    ]:
        expect_status(call, f"{what} on an unknown collection", statuses=(404,))
    try:  # Qdrant answers 200 {"result": false}; a 404 is fine too
        check(c.delete_collection(MISSING) is False, "delete_collection of an unknown collection returned true")
    except UnexpectedResponse as e:
        check(e.status_code == 404, f"delete_collection of an unknown collection: HTTP {e.status_code}")
    bad_filter = {"must": [{"key": "x", "match": {"nope": 1}}]}
    for path, body in [("query", {"query": good, "filter": bad_filter}), ("scroll", {"filter": bad_filter}),
                       ("count", {"filter": bad_filter}), ("query", {"query": good, "filter": {"must": [{"key": 5}]}})]:
        expect_status(lambda: srv.raw("POST", f"/collections/{BAD}/points/{path}", body), f"malformed filter on {path}")
    expect_status(lambda: srv.raw("PUT", f"/collections/{BAD}/points", data=b'{"points": [{"id": 1, '),
                  "truncated JSON body")
    expect_status(lambda: srv.raw("PUT", f"/collections/{BAD}/points", {"points": [{"id": 1}]}),
                  "a point without a vector")
    # Over the batch cap (10,000 points) and, at ~7.7 MB, probably over the body cap too.
    big = ('{"points":[' + ",".join('{"id":%d,"vector":[%s]}' % (i, ",".join(["1"] * DIM))
                                    for i in range(10_001)) + "]}").encode()
    for label, data in (("10,001 points", big), ("a 16 MiB body", b'{"points":[{"id":1,"payload":{"s":"'
                                                                    + b"x" * (16 << 20) + b'"}}]}')):
        status = srv.send_big(f"/collections/{BAD}/points?wait=true", data)
        if status is None:
            print(f"    note: {label}: the server closed the connection before answering (taken as a rejection)")
        else:
            check(status in (400, 413), f"upsert of {label}: expected 400/413, got {status}")
    params = models.VectorParams(size=DIM, distance=models.Distance.COSINE)
    for name in ("bad name/..", "a" * 300, "has\nnewline"):
        expect_status(lambda: c.create_collection(name, vectors_config=params), f"create collection {name[:20]!r}")
    for bad_id in (-1, "not-a-uuid", 1.5):
        expect_status(lambda: srv.raw("PUT", f"/collections/{BAD}/points?wait=true",
                                      {"points": [{"id": bad_id, "vector": good}]}), f"upsert with id {bad_id!r}")
    expect_status(lambda: c.upsert(BAD, points=[models.PointStruct(id="not-a-uuid", vector=good)]),
                  "client upsert with id 'not-a-uuid'")
    expect_status(lambda: srv.raw("GET", f"/collections/{BAD}/points/not-a-uuid"), "GET point 'not-a-uuid'")
    expect_status(lambda: srv.raw("POST", f"/collections/{BAD}/points", {"ids": [-5]}), "retrieve id -5")
    check(c.count(BAD, exact=True).count == 0, "rejected upserts left points behind")
    healthz_ok(srv)
    c.delete_collection(BAD)


def check_error_shape(srv):
    """Errors carry Qdrant's body, {"status": {"error": "..."}, "time": ...}."""
    status, body = srv.raw("GET", f"/collections/{MISSING}")
    check(status == 404, f"GET unknown collection: {status}")
    check(isinstance(body, dict) and isinstance(body.get("status"), dict)
          and isinstance(body["status"].get("error"), str),
          f'a 404 body should be {{"status": {{"error": "..."}}, "time": ...}}, got {str(body)[:200]}')


def check_auth(srv):
    if not srv.auth:
        print("    skipped: auth is off")
        return
    a, r, w = srv.admin, srv.reader, srv.writer
    fresh_collection(a, AUTH)
    vec = unit(np.arange(1, DIM + 1, dtype=np.float64)).tolist()
    completed(w.upsert(AUTH, points=[models.PointStruct(id=i, vector=vec, payload={"i": i}) for i in range(5)],
                       wait=True), "writer upsert")
    for path, method, body in [("/collections", "GET", None), (f"/collections/{AUTH}", "GET", None),
                               (f"/collections/{AUTH}/points/count", "POST", {})]:
        expect_status(lambda: srv.raw(method, path, body, key=None), f"{method} {path} without a key", statuses=(401,))
        expect_status(lambda: srv.raw(method, path, body, key="not-a-real-key"), f"{method} {path} with a wrong key",
                      statuses=(401, 403))
    expect_status(lambda: srv.client(None).get_collections(), "QdrantClient without api_key", statuses=(401,))
    # Reader: reads only.
    check(AUTH in [d.name for d in r.get_collections().collections] and r.collection_exists(AUTH)
          and r.get_collection(AUTH).config.params.vectors.size == DIM, "reader get_collections/exists/get")
    check(len(r.query_points(AUTH, query=vec, limit=3).points) == 3, "reader query_points")
    check(len(r.retrieve(AUTH, ids=[0, 1])) == 2 and r.count(AUTH).count == 5 and len(r.scroll(AUTH)[0]) == 5,
          "reader retrieve/count/scroll")
    for what, call in [("upsert", lambda: r.upsert(AUTH, points=[models.PointStruct(id=9, vector=vec)])),
                       ("delete points", lambda: r.delete(AUTH, points_selector=[0])),
                       ("set_payload", lambda: r.set_payload(AUTH, payload={"x": 1}, points=[0])),
                       ("create_collection", lambda: r.create_collection(TMP, vectors_config=models.VectorParams(
                           size=DIM, distance="Cosine"))),
                       ("delete_collection", lambda: r.delete_collection(AUTH))]:
        expect_status(call, f"reader key: {what}", statuses=(403,))
    # Writer: points yes, collections no.
    completed(w.upsert(AUTH, points=[models.PointStruct(id=9, vector=vec)], wait=True), "writer upsert")
    completed(w.set_payload(AUTH, payload={"x": 1}, points=[9], wait=True), "writer set_payload")
    completed(w.delete(AUTH, points_selector=models.PointIdsList(points=[9]), wait=True), "writer delete")
    expect_status(lambda: w.create_collection(TMP, vectors_config=models.VectorParams(size=DIM, distance="Cosine")),
                  "writer key: create_collection", statuses=(403,))
    expect_status(lambda: w.delete_collection(AUTH), "writer key: delete_collection", statuses=(403,))
    check(a.collection_exists(AUTH) and not a.collection_exists(TMP), "a 403 create/delete changed collections")
    # Authorization: Bearer works like api-key.
    bearer = {role: {"Authorization": f"Bearer {key}"} for role, key in srv.keys.items()}
    status, _ = srv.raw("GET", f"/collections/{AUTH}", key=None, headers=bearer["reader"])
    check(status == 200, f"Bearer reader key: GET collection answered {status}")
    upsert = {"points": [{"id": 7, "vector": vec}]}
    expect_status(lambda: srv.raw("PUT", f"/collections/{AUTH}/points?wait=true", upsert, key=None,
                                  headers=bearer["reader"]), "Bearer reader key: upsert", statuses=(403,))
    status, body = srv.raw("PUT", f"/collections/{AUTH}/points?wait=true", upsert, key=None, headers=bearer["writer"])
    check(status == 200, f"Bearer writer key: upsert answered {status}: {body}")
    check(a.delete_collection(AUTH) is True, "admin delete_collection")


def cleanup(srv):
    for name in (MAIN, MIXED, DOCS, BAD, AUTH, TMP):
        if srv.admin.collection_exists(name):
            srv.admin.delete_collection(name)


# --------------------------------------------------------------------------- persistence phases

def persist_dataset():
    return Dataset(PERSIST_SEED, PERSIST_N, id_kind="mixed")


def phase_write(srv):
    ds = persist_dataset()
    fresh_collection(srv.admin, PERSIST)
    ds.upsert(srv.writer, PERSIST)
    n = srv.reader.count(PERSIST, exact=True).count
    check(n == PERSIST_N, f"{PERSIST}: count {n} after writing {PERSIST_N}")
    print(f"{PERSIST}: wrote {n} ids")


def phase_verify(srv):
    ds = persist_dataset()
    check(srv.reader.collection_exists(PERSIST), f"collection {PERSIST!r} is gone after the restart")
    vp = srv.reader.get_collection(PERSIST).config.params.vectors
    check(vp.size == DIM and vp.distance == models.Distance.COSINE, f"{PERSIST}: config now {vp}")
    n = srv.reader.count(PERSIST, exact=True).count
    check(n == PERSIST_N, f"{PERSIST}: count {n}, expected {PERSIST_N}")
    seen = scroll_all(srv.reader, PERSIST, with_vectors=True)
    check(set(seen) == set(ds.ids), f"{PERSIST}: ids differ ({len(set(seen) ^ set(ds.ids))} mismatched)")
    for pid, p in seen.items():
        r = ds.row[pid]
        check(p.payload == ds.payloads[r], f"{PERSIST} id {pid}: payload {p.payload} != {ds.payloads[r]}")
        same_vector(p.vector, ds.vecs[r], f"{PERSIST} id {pid}")
    r = assert_recall(srv.reader, PERSIST, ds, ds.queries(), None, lambda i, p: True, f"{PERSIST} recall")
    print(f"{PERSIST}: {n} points verified, recall@{K} {r:.3f}")


# --------------------------------------------------------------------------- main

def run_steps(steps):
    for name, step in steps:
        t = time.monotonic()
        try:
            step()
        except CheckFailed as e:
            raise CheckFailed(f"[{name}] {e}") from None
        except UnexpectedResponse as e:
            traceback.print_exc()
            raise CheckFailed(f"[{name}] unexpected HTTP {e.status_code}: {e.content[:300]!r}") from None
        except ResponseHandlingException as e:
            traceback.print_exc()
            raise CheckFailed(f"[{name}] qdrant-client could not send or parse: {e.source!r}") from None
        except OSError as e:
            raise CheckFailed(f"[{name}] cannot reach the server: {e}") from None
        print(f"ok  {name}  ({time.monotonic() - t:.1f}s)", flush=True)


def all_steps(srv):
    main = Dataset(20240611, 3000)
    mixed = Dataset(99, 600, id_kind="mixed")
    queries = main.queries()
    return [
        ("version (GET /)", lambda: check_version(srv)),
        ("collections: create/exists/get/list/delete", lambda: check_collections(srv)),
        ("upsert 3000 + 600 points", lambda: check_load(srv, main, mixed)),
        ("query_points recall with filters", lambda: check_filtered_recall(srv, main, mixed, queries)),
        ("exact search", lambda: check_exact(srv, main, queries)),
        ("score_threshold", lambda: check_score_threshold(srv, main, queries)),
        ("offset pagination", lambda: check_pagination(srv, main, queries)),
        ("with_payload / with_vectors", lambda: check_payload_and_vectors(srv, main, queries)),
        ("old search()", lambda: check_old_search(srv, main, queries)),
        ("count", lambda: check_count(srv, main)),
        ("retrieve + GET point", lambda: check_retrieve(srv, main, mixed)),
        ("scroll", lambda: check_scroll(srv, main, mixed)),
        ("set/delete payload, overwrite, wait=False", lambda: check_payload_ops(srv, mixed)),
        ("delete by ids / filter", lambda: check_delete(srv, main, queries)),
        ("Documents (server-side inference)", lambda: check_documents(srv)),
        ("recall on real MiniLM embeddings", lambda: check_minilm_recall(srv)),
        ("bad inputs", lambda: check_bad_inputs(srv)),
        ("error body shape", lambda: check_error_shape(srv)),
        ("auth roles", lambda: check_auth(srv)),
        ("cleanup", lambda: cleanup(srv)),
    ]


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base_url")
    ap.add_argument("admin_key")
    ap.add_argument("reader_key")
    ap.add_argument("writer_key")
    ap.add_argument("--phase", choices=("all", "write", "verify"), default="all")
    args = ap.parse_args(argv)
    keys = [None if k == "-" else k for k in (args.admin_key, args.reader_key, args.writer_key)]
    if len({k is None for k in keys}) != 1:
        ap.error('give all three keys, or "-" for all three')
    srv = Server(args.base_url, *keys)
    steps = {"all": lambda: all_steps(srv),
             "write": lambda: [("persist: write", lambda: phase_write(srv))],
             "verify": lambda: [("persist: verify", lambda: phase_verify(srv))]}[args.phase]()
    try:
        run_steps([("GET /healthz", lambda: healthz_ok(srv))] + steps)
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
