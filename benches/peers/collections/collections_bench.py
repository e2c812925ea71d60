#!/usr/bin/env python3
"""Vector collections, same run, same vectors: semcache's Qdrant-compatible REST API vs Qdrant's
engine (qdrant-edge-py, in-process) vs Chroma's server (chromadb, `chroma run`).

Per system, on one corpus (the bench-peers MiniLM vectors, or --synthetic N clustered unit vectors):
  upsert    points/s, batches of --batch (256) points with payload {"group": i % 20, "tag": one of
            5 strings}, from 1 client and from 16 clients (each into a fresh collection); client-side
            encoding (JSON bodies, Point objects) is done before the clock starts.
  ready     seconds from the last upsert returning until the index is built and searchable
            (qdrant-edge: EdgeShard.optimize(); semcache: polls GET /collections/{name} until
            points_count is right; chroma: no API for it, 0).
  queries   QPS, p50/p99 latency and recall@10 against exact numpy brute force, at 1 and 16
            concurrent clients (threads; one keep-alive HTTP connection per thread for the servers),
            unfiltered and filtered (group == query_index % 20, ~5% of the points; recall against
            brute force over that subset). HNSW M=16, ef_construction=200, ef_search=64.
  memory    RSS of the server process before the collection is created and after it is loaded and
            indexed, divided by the points (semcache: --semcache-pid; chroma: the server process this
            script starts, or --chroma-pid; qdrant-edge: this Python process).

Prints a markdown report (CPU model, date, versions, command line, parameters per system) and
writes it to --out (plus the raw figures as JSON next to it). See README.md in this folder.
"""
import argparse
import datetime
import gc
import http.client
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # keep the brute force off the second core
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chroma: no telemetry calls

import numpy as np  # noqa: E402

TAGS = ["alpha", "beta", "gamma", "delta", "epsilon"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---- corpus ------------------------------------------------------------------------------------
def synthetic(n, n_queries, dim, seed=20240601):
    """Clustered unit vectors (a stand-in for sentence embeddings: many loose topics)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(8, n // 150)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    def draw(m):
        c = rng.integers(0, n_clusters, m)
        x = centers[c] + rng.standard_normal((m, dim)).astype(np.float32) * (0.9 / np.sqrt(dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(n_queries), f"synthetic: {n:,} clustered unit vectors ({n_clusters} clusters), dim {dim}"


def load_corpus(args):
    if args.synthetic:
        v, q, what = synthetic(args.synthetic, args.n_queries or 200, args.dim)
        return v, q, what
    data = Path(args.data) if args.data else None
    if data is None or not (data / "vectors.npy").exists() or not (data / "queries.npy").exists():
        sys.exit(f"no corpus: {data}/vectors.npy and queries.npy not found (set SEMCACHE_BENCH_DATA or --data "
                 "to the bench-peers data folder, which its embed_corpus.py fills), or use --synthetic N")
    v = np.load(data / "vectors.npy").astype(np.float32)
    q = np.load(data / "queries.npy").astype(np.float32)
    total_v, total_q = len(v), len(q)
    if args.limit:
        v = v[: args.limit]
    if args.n_queries:
        q = q[: args.n_queries]
    what = (f"bench-peers corpus {data}: {len(v):,}{f' (first of {total_v:,})' if len(v) < total_v else ''} "
            f"MiniLM vectors of ShareGPT first-turn prompts, dim {v.shape[1]}, {len(q):,}"
            f"{f' (first of {total_q:,})' if len(q) < total_q else ''} held-out queries")
    return v, q, what


def normalize(x):
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def ground_truth(v, q, groups, qgroup, k):
    """Exact top-k by cosine: unfiltered over all points, filtered over points of the query's group."""
    vn, qn = normalize(v), normalize(q)
    s = qn @ vn.T
    top = np.argpartition(-s, k, axis=1)[:, :k]
    unf = [set(map(int, row)) for row in top]
    filt = [None] * len(q)
    for g in np.unique(qgroup):
        members = np.nonzero(groups == g)[0]
        qi = np.nonzero(qgroup == g)[0]
        sg = s[np.ix_(qi, members)]
        kk = min(k, len(members))
        t = np.argpartition(-sg, kk - 1, axis=1)[:, :kk] if kk < len(members) else np.tile(np.arange(kk), (len(qi), 1))
        for row, i in zip(t, qi):
            filt[i] = set(int(members[j]) for j in row)
    return unf, filt


def recall(found, truth, k):
    return float(np.mean([len(set(f[:k]) & t) / max(1, min(k, len(t))) for f, t in zip(found, truth)]))


# ---- process memory and other processes' CPU ---------------------------------------------------
def proc_tree(pid):
    """pid and its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                children.setdefault(int(s[s.rfind(")") + 2:].split()[1]), []).append(int(d))
            except OSError:
                pass
    out, stack = set(), [pid]
    while stack:
        p = stack.pop()
        if p not in out:
            out.add(p)
            stack.extend(children.get(p, []))
    return out


def rss(pid):
    """(VmRSS, RssAnon, RssFile) in bytes, summed over pid and its descendants; None when unreadable."""
    tot = [0, 0, 0]
    seen = False
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    for i, key in enumerate(("VmRSS:", "RssAnon:", "RssFile:")):
                        if line.startswith(key):
                            tot[i] += int(line.split()[1]) * 1024
                            seen = True
        except OSError:
            pass
    return tuple(tot) if seen else None


class ForeignLoad:
    """Average cores used by processes other than this one, its descendants and `exclude` (the
    server under test) between construction and stop(): 0 = quiet machine."""

    def __init__(self, exclude=()):
        self.exclude = [p for p in exclude if p]
        self.t0, self.s0 = time.monotonic(), self._snap()

    @staticmethod
    def _snap():
        snap = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        s = f.read()
                    rest = s[s.rfind(")") + 2:].split()
                    snap[int(d)] = int(rest[11]) + int(rest[12])
                except (OSError, IndexError, ValueError):
                    pass
        return snap

    def stop(self):
        s1, wall = self._snap(), time.monotonic() - self.t0
        mine = proc_tree(os.getpid())
        for p in self.exclude:
            mine |= proc_tree(p)
        ticks = sum(max(0, c - self.s0[p]) for p, c in s1.items() if p not in mine and p in self.s0)
        return ticks / os.sysconf("SC_CLK_TCK") / max(wall, 1e-9)


def cpu_seconds(pids):
    """user+system CPU seconds of the given processes (and descendants)."""
    tot = 0
    for root in pids:
        for p in proc_tree(root):
            try:
                with open(f"/proc/{p}/stat") as f:
                    s = f.read()
                rest = s[s.rfind(")") + 2:].split()
                tot += int(rest[11]) + int(rest[12])
            except (OSError, IndexError, ValueError):
                pass
    return tot / os.sysconf("SC_CLK_TCK")


# ---- HTTP: one keep-alive connection per client thread -----------------------------------------
class HttpConn:
    def __init__(self, base_url, headers=None, timeout=60.0):
        u = urllib.parse.urlsplit(base_url)
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname, u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        self.headers = {"Content-Type": "application/json", "Connection": "keep-alive", **(headers or {})}
        self.timeout = timeout
        self.conn = None

    def connect(self):
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        self.conn = cls(self.host, self.port, timeout=self.timeout)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, method, path, body=None):
        """(status, body bytes); reconnects once if the server closed the kept-alive connection."""
        for attempt in (0, 1):
            if self.conn is None:
                self.connect()
            try:
                self.conn.request(method, self.prefix + path, body=body, headers=self.headers)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.RemoteDisconnected, http.client.CannotSendRequest, BrokenPipeError,
                    ConnectionResetError, http.client.BadStatusLine):
                self.close()
                if attempt:
                    raise

    def json(self, method, path, obj=None, ok=(200,)):
        st, data = self.request(method, path, None if obj is None else json.dumps(obj).encode())
        if st not in ok:
            raise RuntimeError(f"{method} {path} -> HTTP {st}: {data[:300]!r}")
        return json.loads(data) if data else None

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the systems -------------------------------------------------------------------------------
class System:
    """One system under test. Encoded batches/queries are built before the clock starts."""
    name = "?"
    in_process = False

    def __init__(self, args):
        self.args = args
        self.notes = []          # parameters and caveats, printed under the tables
        self.version = "?"

    def setup(self):
        pass

    def teardown(self):
        pass

    def pid(self):
        """Process whose RSS is the system's memory; None = not measured."""
        return None

    def client(self):
        """Per-thread client state."""
        return None

    def close_client(self, c):
        pass

    # collection lifecycle
    def create(self, coll, dim):
        raise NotImplementedError

    def drop(self, coll):
        raise NotImplementedError

    def encode_batches(self, coll, v, ids, payloads):
        raise NotImplementedError

    def upsert(self, c, coll, batch):
        raise NotImplementedError

    def ready(self, coll, n):
        """Block until the loaded points are indexed and searchable."""
        return None

    def encode_queries(self, coll, q, qgroup, filtered):
        raise NotImplementedError

    def query(self, c, coll, prepared):
        """-> list of int ids, best first."""
        raise NotImplementedError


class Semcache(System):
    """semcache's Qdrant-compatible REST API (the server must already be running)."""
    name = "semcache"

    def __init__(self, args):
        super().__init__(args)
        h = {}
        if args.semcache_api_key:
            h["Authorization"] = f"Bearer {args.semcache_api_key}"   # semcache's own auth
            h["api-key"] = args.semcache_api_key                      # Qdrant's header
        self.headers = h
        self.base = args.semcache_url.rstrip("/")

    def conn(self):
        return HttpConn(self.base, self.headers)

    def setup(self):
        c = self.conn()
        try:
            st, data = c.request("GET", "/")
            try:
                j = json.loads(data)
                if not isinstance(j, dict):
                    self.version = "?"
                elif j.get("semcache_version"):
                    self.version = f"{j['semcache_version']} (Qdrant REST {j.get('version', '?')})"
                else:
                    self.version = str(j.get("version") or j.get("title") or "?")
            except ValueError:
                self.version = f"? (GET / -> HTTP {st})"
        except OSError as e:
            raise RuntimeError(f"semcache not reachable at {self.base}: {e}") from e
        finally:
            c.close()
        commit = git_commit()
        if commit:
            self.version += f" (repo at {commit})"
        if not self.args.semcache_pid:
            self.notes.append("memory and server CPU not measured, and the server's CPU counts as 'other load': "
                              "pass --semcache-pid PID of the server")
        self.notes.append(f"{self.base}, Qdrant REST bodies; one keep-alive connection per client thread; "
                          f"search params {{\"hnsw_ef\": {self.args.ef}}} on every query")

    def pid(self):
        return self.args.semcache_pid

    def client(self):
        c = self.conn()
        c.connect()  # before the clock starts
        return c

    def close_client(self, c):
        c.close()

    def create(self, coll, dim):
        c = self.conn()
        try:
            st, _ = c.request("DELETE", f"/collections/{coll}")
            body = {"vectors": {"size": dim, "distance": "Cosine"},
                    "hnsw_config": {"m": self.args.m, "ef_construct": self.args.ef_construction}}
            st, data = c.request("PUT", f"/collections/{coll}", json.dumps(body).encode())
            if 400 <= st < 500 and st not in (401, 403):
                log(f"semcache: PUT /collections/{coll} with hnsw_config -> {st} {data[:200]!r}; retrying without")
                del body["hnsw_config"]
                st, data = c.request("PUT", f"/collections/{coll}", json.dumps(body).encode())
                self.note_once(f"the server refused hnsw_config (M={self.args.m}, ef_construct="
                               f"{self.args.ef_construction}); ran with its own defaults")
            else:
                self.note_once(f"sent hnsw_config m={self.args.m}, ef_construct={self.args.ef_construction} "
                               "with the collection")
            if st not in (200, 201):
                raise RuntimeError(f"PUT /collections/{coll} -> HTTP {st}: {data[:300]!r}")
            st, data = c.request("GET", f"/collections/{coll}")
            try:
                hc = json.loads(data)["result"]["config"]["hnsw_config"]
                self.note_once(f"GET /collections/{{name}} reports hnsw_config m={hc.get('m')}, "
                               f"ef_construct={hc.get('ef_construct')}")
            except (ValueError, KeyError, TypeError):
                self.note_once(f"GET /collections/{{name}} (HTTP {st}) reports no hnsw_config")
            st, data = c.request("PUT", f"/collections/{coll}/index?wait=true",
                                 json.dumps({"field_name": "group", "field_schema": "integer"}).encode())
            self.note_once("payload index on group: " + ("created" if st in (200, 201) else
                                                         f"PUT /collections/{{name}}/index -> HTTP {st} (not used)"))
        finally:
            c.close()

    def note_once(self, s):
        if s not in self.notes:
            self.notes.append(s)

    def drop(self, coll):
        c = self.conn()
        try:
            c.request("DELETE", f"/collections/{coll}")
        finally:
            c.close()

    def encode_batches(self, coll, v, ids, payloads):
        out = []
        for b in range(0, len(ids), self.args.batch):
            pts = [{"id": int(i), "vector": v[i].tolist(), "payload": payloads[i]} for i in ids[b:b + self.args.batch]]
            out.append(json.dumps({"points": pts}).encode())
        return out

    def upsert(self, c, coll, batch):
        st, data = c.request("PUT", f"/collections/{coll}/points?wait=true", batch)
        if st not in (200, 201, 202):
            raise RuntimeError(f"upsert -> HTTP {st}: {data[:300]!r}")

    def ready(self, coll, n):
        c = self.conn()
        try:
            deadline = time.monotonic() + 300
            cnt = status = None
            while time.monotonic() < deadline:
                st, data = c.request("GET", f"/collections/{coll}")
                if st != 200:
                    self.note_once(f"GET /collections/{{name}} -> HTTP {st}: ready time not measured")
                    return None
                res = (json.loads(data) or {}).get("result") or {}
                cnt = res.get("points_count")
                status = res.get("status")
                if cnt is None:
                    self.note_once("GET /collections/{name} has no points_count: ready time not measured")
                    return None
                if cnt >= n and status != "yellow":  # Qdrant: yellow = optimizing
                    return True
                time.sleep(0.05)
            raise RuntimeError(f"collection {coll} not ready after 300 s ({cnt} of {n} points, status {status})")
        finally:
            c.close()

    def encode_queries(self, coll, q, qgroup, filtered):
        out = []
        for i in range(len(q)):
            body = {"query": q[i].tolist(), "limit": self.args.k, "params": {"hnsw_ef": self.args.ef}}
            if filtered:
                body["filter"] = {"must": [{"key": "group", "match": {"value": int(qgroup[i])}}]}
            out.append(json.dumps(body).encode())
        return out

    def query(self, c, coll, prepared):
        st, data = c.request("POST", f"/collections/{coll}/points/query", prepared)
        if st != 200:
            raise RuntimeError(f"query -> HTTP {st}: {data[:300]!r}")
        res = json.loads(data)["result"]
        pts = res["points"] if isinstance(res, dict) else res
        return [int(p["id"]) for p in pts]


class QdrantEdge(System):
    """Qdrant's engine in-process: qdrant-edge-py's EdgeShard."""
    name = "qdrant-edge"
    in_process = True

    def setup(self):
        import qdrant_edge as qe
        self.qe = qe
        self.version = "qdrant-edge-py " + importlib.metadata.version("qdrant-edge-py")
        self.shards = {}
        self.root = Path(tempfile.mkdtemp(prefix="qdrant-edge-", dir=self.args.workdir))
        a = self.args
        fst_vectors = a.qdrant_full_scan_kb * 1024 // (a.dim * 4)
        self.notes.append(
            f"EdgeShard, Distance.Cosine, HnswIndexConfig(m={a.m}, ef_construct={a.ef_construction}, "
            f"full_scan_threshold={a.qdrant_full_scan_kb} KB = {fst_vectors:,} vectors of dim {a.dim}, "
            f"max_indexing_threads=0 = auto), indexing_threshold=1 KB (so optimize() builds HNSW at any size), "
            f"integer payload index on group, SearchParams(hnsw_ef={a.ef}), "
            f"max_search_threads={a.qdrant_search_threads or 'default (CPU count)'}; WAL on, data under {self.root}")
        self.fst_vectors = fst_vectors

    def plan_notes(self, n, groups):
        per_group = n // groups
        if n < self.fst_vectors:
            self.notes.append(f"all {n:,} points are below full_scan_threshold ({self.fst_vectors:,} vectors): Qdrant's "
                              "planner answers even unfiltered queries by exact scan (recall 1.0 is by design; "
                              "the full-size corpus uses HNSW)")
        if per_group < self.fst_vectors:
            self.notes.append(f"filtered: ~{per_group:,} matching points < full_scan_threshold: Qdrant's planner "
                              "scores the payload-index matches exactly instead of walking the HNSW graph "
                              "(its default behaviour; --qdrant-full-scan-kb changes it)")

    def pid(self):
        return os.getpid()

    def create(self, coll, dim):
        qe, a = self.qe, self.args
        cfg = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine),
            hnsw_config=qe.HnswIndexConfig(m=a.m, ef_construct=a.ef_construction,
                                           full_scan_threshold=a.qdrant_full_scan_kb),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
            max_search_threads=a.qdrant_search_threads or None)
        path = self.root / coll
        if path.exists():
            shutil.rmtree(path)
        shard = qe.EdgeShard.create(str(path), cfg)
        shard.update(qe.UpdateOperation.create_field_index("group", qe.PayloadSchemaType.Integer))
        self.shards[coll] = shard

    def drop(self, coll):
        shard = self.shards.pop(coll, None)
        if shard is not None:
            shard.close()
        shutil.rmtree(self.root / coll, ignore_errors=True)

    def teardown(self):
        for coll in list(getattr(self, "shards", {})):
            self.drop(coll)
        if getattr(self, "root", None):
            shutil.rmtree(self.root, ignore_errors=True)

    def encode_batches(self, coll, v, ids, payloads):
        qe = self.qe
        return [[qe.Point(int(i), v[i].tolist(), payloads[i]) for i in ids[b:b + self.args.batch]]
                for b in range(0, len(ids), self.args.batch)]

    def upsert(self, c, coll, batch):
        self.shards[coll].update(self.qe.UpdateOperation.upsert_points(batch))

    def ready(self, coll, n):
        shard = self.shards[coll]
        shard.optimize()
        info = shard.info()
        if info.points_count != n:
            raise RuntimeError(f"qdrant-edge holds {info.points_count} points, expected {n}")
        self.last_info = (info.segments_count, info.points_count, info.indexed_vectors_count)
        return True

    def encode_queries(self, coll, q, qgroup, filtered):
        qe = self.qe
        out = []
        for i in range(len(q)):
            f = (qe.Filter(must=[qe.FieldCondition(key="group", match=qe.MatchValue(int(qgroup[i])))])
                 if filtered else None)
            out.append(qe.QueryRequest(limit=self.args.k, query=qe.Query.Nearest(q[i].tolist()), filter=f,
                                       params=qe.SearchParams(hnsw_ef=self.args.ef),
                                       with_payload=False, with_vector=False))
        return out

    def query(self, c, coll, prepared):
        return [int(p.id) for p in self.shards[coll].query(prepared)]

    def gil_probe(self, coll, prepared):
        """Can Python threads run EdgeShard queries in parallel? (1) the same 2N queries from one
        thread and from two threads (N each), beside the same test on a numpy mat-vec, which releases
        the GIL, as the machine's reference; (2) a Python spin loop's rate during one long
        EdgeShard.query_batch call relative to its rate alone (~0 = the call holds the GIL)."""
        shard = self.shards[coll]
        reqs = list(prepared)

        def speedup(fn, items):
            def loop(xs):
                for x in xs:
                    fn(x)
            t0 = time.perf_counter()
            loop(items + items)
            one = time.perf_counter() - t0
            ths = [threading.Thread(target=loop, args=(items,)) for _ in range(2)]
            t0 = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            return one / (time.perf_counter() - t0)

        reps = max(1, int(0.2 / max(1e-6, timeit_once(lambda: [shard.query(r) for r in reqs]))))
        engine = speedup(shard.query, reqs * reps)
        mat = np.random.default_rng(0).standard_normal((20000, 384)).astype(np.float32)
        vec = mat[0].copy()
        reference = speedup(lambda _: mat @ vec, list(range(max(20, int(0.2 / max(1e-6, timeit_once(lambda: mat @ vec)))))))

        big = self.qe.QueryBatchRequest(reqs * max(1, int(0.3 / max(1e-6, timeit_once(
            lambda: shard.query_batch(self.qe.QueryBatchRequest(reqs)))))))
        count, stop = [0], threading.Event()

        def spin():
            while not stop.is_set():
                count[0] += 1

        th = threading.Thread(target=spin)
        th.start()
        time.sleep(0.05)
        c0, t0 = count[0], time.perf_counter()
        time.sleep(0.2)
        alone = (count[0] - c0) / (time.perf_counter() - t0)
        c0, t0 = count[0], time.perf_counter()
        shard.query_batch(big)
        during = (count[0] - c0) / (time.perf_counter() - t0)
        stop.set()
        th.join()
        return {"two_thread_speedup": engine, "numpy_two_thread_speedup": reference,
                "query_batch_spin_ratio": during / max(alone, 1e-9)}


def timeit_once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Chroma(System):
    """Chroma's server (`chroma run`, the Rust frontend in chromadb's wheel) over HTTP."""
    name = "chroma"

    def setup(self):
        import chromadb
        self.chromadb = chromadb
        a = self.args
        self.proc = None
        if a.chroma_url:
            self.url = a.chroma_url.rstrip("/")
            self.server_pid = a.chroma_pid
        else:
            exe = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
            if not exe:
                raise RuntimeError("no `chroma` executable (pip install chromadb into this venv)")
            port = a.chroma_port or free_port()
            self.dir = Path(tempfile.mkdtemp(prefix="chroma-", dir=a.workdir))
            self.logf = open(self.dir.parent / (self.dir.name + ".log"), "wb")
            self.proc = subprocess.Popen([exe, "run", "--path", str(self.dir), "--host", "127.0.0.1",
                                          "--port", str(port)], stdout=self.logf, stderr=subprocess.STDOUT,
                                         env={**os.environ, "ANONYMIZED_TELEMETRY": "False"})
            self.server_pid = self.proc.pid
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            c = HttpConn(self.url)
            while True:
                try:
                    st, _ = c.request("GET", "/api/v2/heartbeat")
                    if st == 200:
                        break
                except OSError:
                    c.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chroma server did not start (log: {self.logf.name})")
                time.sleep(0.2)
            c.close()
        u = urllib.parse.urlsplit(self.url)
        self.host, self.port = u.hostname, u.port or 80
        self.client_api = chromadb.HttpClient(host=self.host, port=self.port)
        self.version = f"chromadb {chromadb.__version__} (server {self.client_api.get_version()})"
        self.notes.append(
            f"{'server started by this script: chroma run --path ' + str(self.dir) if self.proc else self.url}; "
            f"configuration hnsw: space=cosine, max_neighbors={a.m}, ef_construction={a.ef_construction}, "
            f"ef_search={a.ef} (a collection setting, not per query), other HNSW settings at Chroma's defaults "
            f"(batch_size=100, sync_threshold=1000, num_threads=CPU count); ids are strings; filter where "
            f"{{\"group\": k}} (Chroma indexes every metadata key)")
        if a.chroma_client == "raw":
            self.notes.append("data plane: raw REST v2 (/api/v2/.../upsert, /query with float lists), one keep-alive "
                              "connection per client thread, like semcache; collections created with chromadb.HttpClient")
        else:
            self.notes.append("data plane: chromadb.HttpClient (collection.upsert/query; embeddings sent as base64), "
                              "one client per thread; includes the Python client's own per-call work")
        if not self.server_pid:
            self.notes.append("memory and server CPU not measured, and the server's CPU counts as 'other load': "
                              "pass --chroma-pid PID of the server")

    def pid(self):
        return self.server_pid

    def teardown(self):
        if getattr(self, "proc", None) is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.logf.close()
            if self.proc.returncode in (0, -15):  # stopped cleanly: the log is not needed
                os.unlink(self.logf.name)
            else:
                log(f"chroma server exited with {self.proc.returncode}; its log: {self.logf.name}")
            shutil.rmtree(self.dir, ignore_errors=True)

    def create(self, coll, dim):
        try:
            self.client_api.delete_collection(coll)
        except Exception:  # noqa: BLE001 - absent is fine
            pass
        a = self.args
        col = self.client_api.create_collection(
            coll, embedding_function=None,
            configuration={"hnsw": {"space": "cosine", "max_neighbors": a.m, "ef_construction": a.ef_construction,
                                    "ef_search": a.ef}})
        self.cols = getattr(self, "cols", {})
        self.cols[coll] = col
        self.paths = getattr(self, "paths", {})
        self.paths[coll] = f"/api/v2/tenants/{col.tenant}/databases/{col.database}/collections/{col.id}"

    def drop(self, coll):
        try:
            self.client_api.delete_collection(coll)
        except Exception:  # noqa: BLE001
            pass

    def client(self):
        if self.args.chroma_client == "raw":
            c = HttpConn(self.url)
            c.connect()  # before the clock starts
            return c
        c = self.chromadb.HttpClient(host=self.host, port=self.port)
        return {"client": c, "cols": {}}

    def close_client(self, c):
        if isinstance(c, HttpConn):
            c.close()

    def _col(self, c, coll):
        if coll not in c["cols"]:
            c["cols"][coll] = c["client"].get_collection(coll, embedding_function=None)
        return c["cols"][coll]

    def encode_batches(self, coll, v, ids, payloads):
        out = []
        for b in range(0, len(ids), self.args.batch):
            chunk = ids[b:b + self.args.batch]
            if self.args.chroma_client == "raw":
                out.append(json.dumps({"ids": [str(i) for i in chunk], "embeddings": v[chunk].tolist(),
                                       "metadatas": [payloads[i] for i in chunk]}).encode())
            else:
                out.append(([str(i) for i in chunk], v[chunk], [payloads[i] for i in chunk]))
        return out

    def upsert(self, c, coll, batch):
        if isinstance(c, HttpConn):
            st, data = c.request("POST", self.paths[coll] + "/upsert", batch)
            if st not in (200, 201):
                raise RuntimeError(f"chroma upsert -> HTTP {st}: {data[:300]!r}")
        else:
            ids, emb, metas = batch
            self._col(c, coll).upsert(ids=ids, embeddings=emb, metadatas=metas)

    def ready(self, coll, n):
        cnt = self.client_api.get_collection(coll, embedding_function=None).count()
        if cnt != n:
            raise RuntimeError(f"chroma holds {cnt} points, expected {n}")
        return None  # no API on a single-node server says when the HNSW index has caught up

    def encode_queries(self, coll, q, qgroup, filtered):
        out = []
        for i in range(len(q)):
            where = {"group": int(qgroup[i])} if filtered else None
            if self.args.chroma_client == "raw":
                body = {"query_embeddings": [q[i].tolist()], "n_results": self.args.k, "include": []}
                if where:
                    body["where"] = where
                out.append(json.dumps(body).encode())
            else:
                out.append((q[i:i + 1], where))
        return out

    def query(self, c, coll, prepared):
        if isinstance(c, HttpConn):
            st, data = c.request("POST", self.paths[coll] + "/query", prepared)
            if st != 200:
                raise RuntimeError(f"chroma query -> HTTP {st}: {data[:300]!r}")
            return [int(i) for i in json.loads(data)["ids"][0]]
        emb, where = prepared
        r = self._col(c, coll).query(query_embeddings=emb, n_results=self.args.k, where=where, include=[])
        return [int(i) for i in r["ids"][0]]


# ---- measurement -------------------------------------------------------------------------------
def run_threads(system, n_clients, work, fn):
    """Runs fn(client, item) over work split round-robin over n_clients threads, each with its own
    client. Returns (wall seconds, per-item results, per-item latencies, errors)."""
    results = [None] * len(work)
    lat = [None] * len(work)
    errors = []
    clients = [system.client() for _ in range(n_clients)]
    barrier = threading.Barrier(n_clients + 1)
    ends = [0.0] * n_clients

    def worker(t):
        c = clients[t]
        barrier.wait()
        for i in range(t, len(work), n_clients):
            t0 = time.perf_counter()
            try:
                results[i] = fn(c, work[i])
            except Exception as e:  # noqa: BLE001 - counted and reported
                if len(errors) < 5:
                    errors.append(f"{type(e).__name__}: {e}")
                else:
                    errors.append("")
            lat[i] = time.perf_counter() - t0
        ends[t] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(n_clients)]
    for th in threads:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in threads:
        th.join()
    wall = max(ends) - start
    for c in clients:
        system.close_client(c)
    return wall, results, lat, errors


def bench_system(system, v, q, qgroup, truth, args):
    n, dim = v.shape
    ids = list(range(n))
    payloads = [{"group": i % args.groups, "tag": TAGS[i % len(TAGS)]} for i in ids]
    out = {"system": system.name, "upsert": [], "queries": [], "memory": None}
    try:
        system.setup()
        out["version"] = system.version
        if hasattr(system, "plan_notes"):
            system.plan_notes(n, args.groups)
        exclude = [system.pid()] if system.pid() and not system.in_process else []
        coll = args.collection
        upsert_clients = sorted(set(args.upsert_clients))
        first = upsert_clients[0]
        log(f"[{system.name}] encoding {n:,} points in batches of {args.batch}")
        batches = system.encode_batches(coll, v, ids, payloads)
        # warm-up cycle (create, one batch, a query, drop) so code pages and lazily-started parts of
        # the server are resident before the memory baseline
        warm = f"{coll}_warmup"
        system.create(warm, dim)
        wc = system.client()
        system.upsert(wc, warm, batches[0])
        system.ready(warm, min(n, args.batch))
        system.query(wc, warm, system.encode_queries(warm, q[:1], qgroup[:1], False)[0])
        system.close_client(wc)
        system.drop(warm)
        gc.collect()
        pid = system.pid()
        before = rss(pid) if pid else None

        def load(n_clients, coll_name):
            system.create(coll_name, dim)
            fl = ForeignLoad(exclude)
            wall, _, lat, errs = run_threads(system, n_clients, batches, lambda c, b: system.upsert(c, coll_name, b))
            if errs:
                raise RuntimeError(f"{len([e for e in errs])} upsert batches failed: {[e for e in errs if e][:3]}")
            t0 = time.perf_counter()
            r = system.ready(coll_name, n)
            ready_s = time.perf_counter() - t0 if r else None
            if system.name == "semcache" and args.semcache_settle > 0:
                # Upkeep freezes a grown collection's live graph into a segment within one
                # sweep interval; measure the steady state, not the minutes after a load.
                time.sleep(args.semcache_settle)
            row = {"clients": n_clients, "points": n, "batch": args.batch, "seconds": wall,
                   "points_per_s": n / wall, "ready_s": ready_s,
                   "batch_p50_ms": 1e3 * statistics.median(lat), "foreign_cores": fl.stop()}
            log(f"[{system.name}] upsert {n_clients} client(s): {row}")
            out["upsert"].append(row)

        # 1) load with the first client count; memory; queries on this collection
        load(first, coll)
        gc.collect()
        after = rss(pid) if pid else None
        if before and after:
            out["memory"] = {"pid": pid, "points": n, "rss_before": before[0], "rss_after": after[0],
                             "bytes_per_point": (after[0] - before[0]) / n,
                             "anon_bytes_per_point": (after[1] - before[1]) / n,
                             "file_bytes_per_point": (after[2] - before[2]) / n}
        if getattr(system, "last_info", None):
            system.notes.append("after optimize(): segments, points, indexed vectors = %d, %d, %d" % system.last_info)

        for filtered in (False, True):
            prepared = system.encode_queries(coll, q, qgroup, filtered)
            want = truth[1] if filtered else truth[0]
            # warm-up: one pass of min(100, Q) queries on one client
            run_threads(system, 1, prepared[: min(100, len(prepared))], lambda c, p: system.query(c, coll, p))
            if system.in_process and not filtered and "gil_probe" not in out:
                g = system.gil_probe(coll, prepared[: min(200, len(prepared))])
                out["gil_probe"] = g
                parallel = g["two_thread_speedup"] > 1.3
                machine_parallel = g["numpy_two_thread_speedup"] > 1.3
                system.notes.append(
                    f"GIL: the same queries from 2 Python threads ran {g['two_thread_speedup']:.2f}x as fast as from 1 "
                    f"(numpy mat-vec, which releases the GIL, {g['numpy_two_thread_speedup']:.2f}x on this machine); "
                    f"a Python thread kept {g['query_batch_spin_ratio']:.0%} of its speed during one long "
                    f"EdgeShard.query_batch call (~0% = the call holds the GIL). So EdgeShard.query "
                    + ("runs in parallel across Python threads (releases the GIL)" if parallel else
                       "does not run in parallel across Python threads (holds the GIL, or serializes inside)"
                       if machine_parallel else
                       "showed no parallel speedup, but neither did numpy: other load left no second core, so "
                       "this run cannot tell")
                    + "; the 16-client rows are 16 Python threads sharing one EdgeShard"
                    + (", i.e. an application's threads taking turns, not engine parallelism"
                       if machine_parallel and not parallel else ""))
            for n_clients in args.clients:
                qps, lats, errs_all, rec = [], [], 0, None
                fl = ForeignLoad(exclude)
                cpu0 = cpu_seconds(exclude) if exclude else None
                for _ in range(args.repeats):
                    wall, res, lat, errs = run_threads(system, n_clients, prepared,
                                                       lambda c, p: system.query(c, coll, p))
                    qps.append(len(prepared) / wall)
                    lats.extend(lat)
                    errs_all += len(errs)
                    if errs:
                        log(f"[{system.name}] {len(errs)} query errors, e.g. {[e for e in errs if e][:2]}")
                    rec = recall([r or [] for r in res], want, args.k)
                server_cpu = ((cpu_seconds(exclude) - cpu0) / (len(prepared) * args.repeats) * 1e6
                              if exclude else None)
                row = {"filtered": filtered, "clients": n_clients, "qps": statistics.median(qps),
                       "qps_all": qps, "recall@10": rec, "p50_ms": 1e3 * float(np.percentile(lats, 50)),
                       "p99_ms": 1e3 * float(np.percentile(lats, 99)), "errors": errs_all,
                       "server_cpu_us_per_query": server_cpu, "foreign_cores": fl.stop()}
                log(f"[{system.name}] query filtered={filtered} clients={n_clients}: "
                    f"qps={row['qps']:.0f} recall={rec:.4f} p50={row['p50_ms']:.2f}ms errors={errs_all}")
                out["queries"].append(row)
        system.drop(coll)

        # 2) the other upsert client counts, each into a fresh collection
        for n_clients in upsert_clients[1:]:
            name = f"{coll}_c{n_clients}"
            load(n_clients, name)
            system.drop(name)
    finally:
        out["notes"] = system.notes
        system.teardown()
    return out


# ---- report ------------------------------------------------------------------------------------
def git_commit():
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return (r.stdout.strip() + ("+changes" if dirty else "")) if r.returncode == 0 else None
    except OSError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def report(meta, results):
    md = ["## Vector collections: semcache vs Qdrant engine (qdrant-edge-py) vs Chroma server", "",
          f"Date: {meta['date']}. CPU: {meta['cpu']} ({meta['nproc']} cores), {meta['mem']} memory, "
          f"Python {meta['python']}, numpy {meta['numpy']}.", "",
          f"Command: `{meta['command']}`", "",
          f"Corpus: {meta['corpus']}. Payload {{\"group\": i % {meta['groups']}, \"tag\": one of 5 strings}}. "
          f"Filtered queries: group == query index % {meta['groups']} (~{100 / meta['groups']:.0f}% of the points); "
          f"recall@{meta['k']} against exact numpy brute force over all points / over the query's group. "
          f"HNSW M={meta['m']}, ef_construction={meta['ef_construction']}, ef_search={meta['ef']}. "
          f"QPS: median of {meta['repeats']} passes over the {meta['n_queries']:,} queries; latency percentiles over "
          f"all passes; client-side encoding done before timing. 'other load' = cores used by processes "
          f"other than this script and the server under test (0 = quiet machine).", ""]
    md.append("Versions: " + "; ".join(f"{r['system']}: {r.get('version', '?')}" for r in results))
    md.append("")
    md.append("### Upsert")
    md.append("")
    rows = []
    for r in results:
        for u in r["upsert"]:
            rows.append([r["system"], u["clients"], f"{u['points']:,}", u["batch"], f"{u['seconds']:.2f}",
                         f"{u['points_per_s']:,.0f}", fmt(u["ready_s"], ".2f"), f"{u['batch_p50_ms']:.1f}",
                         f"{u['foreign_cores']:.2f}"])
        if r.get("error"):
            rows.append([r["system"], "-", "-", "-", "-", "failed", "-", "-", "-"])
    md.append(md_table(["system", "clients", "points", "batch", "upsert s", "points/s",
                        "then ready s (index built)", "batch p50 ms", "other load (cores)"], rows))
    md += ["", "### Queries (top-10)", ""]
    rows = []
    for r in results:
        for x in r["queries"]:
            rows.append([r["system"], "group == k" if x["filtered"] else "none", x["clients"], f"{x['qps']:,.0f}",
                         f"{x['recall@10']:.4f}", f"{x['p50_ms']:.2f}", f"{x['p99_ms']:.2f}",
                         fmt(x["server_cpu_us_per_query"], ",.0f"), x["errors"], f"{x['foreign_cores']:.2f}"])
    md.append(md_table(["system", "filter", "clients", "QPS", "recall@10", "p50 ms", "p99 ms",
                        "server CPU µs/query", "errors", "other load (cores)"], rows))
    md += ["", "### Memory per point", ""]
    rows = []
    for r in results:
        m = r.get("memory")
        if m:
            rows.append([r["system"], f"{m['points']:,}", f"{m['rss_before'] / 2**20:.1f}",
                         f"{m['rss_after'] / 2**20:.1f}", f"{m['bytes_per_point']:,.0f}",
                         f"{m['anon_bytes_per_point']:,.0f}", f"{m['file_bytes_per_point']:,.0f}",
                         "this Python process (in-process engine)" if r["system"] == "qdrant-edge" else
                         f"server pid {m['pid']}"])
        else:
            rows.append([r["system"], "-", "-", "-", "not measured", "-", "-", "-"])
    md.append(md_table(["system", "points", "RSS before (MiB)", "RSS after load (MiB)", "bytes/point (RSS)",
                        "of which anon", "of which file-backed", "process"], rows))
    md.append("")
    md.append(f"Raw vectors alone: {meta['dim'] * 4:,} bytes/point (dim {meta['dim']} float32).")
    md += ["", "### Parameters and notes per system", ""]
    for r in results:
        for note in r.get("notes", []):
            md.append(f"- {r['system']}: {note}")
        if r.get("error"):
            md.append(f"- {r['system']}: FAILED: {r['error']}")
    return "\n".join(md) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=None,
                   help="comma list of semcache,qdrant-edge,chroma (default: qdrant-edge,chroma, plus semcache "
                        "when --semcache-url is given)")
    p.add_argument("--data", default=os.environ.get("SEMCACHE_BENCH_DATA"),
                   help="folder with vectors.npy and queries.npy (default: $SEMCACHE_BENCH_DATA)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="use N synthetic clustered unit vectors instead of the corpus (smoke runs)")
    p.add_argument("--dim", type=int, default=384, help="dimension of --synthetic vectors")
    p.add_argument("--limit", type=int, default=0, help="use only the first N corpus vectors")
    p.add_argument("--n-queries", type=int, default=0,
                   help="queries to use (default: all of queries.npy; 200 with --synthetic)")
    p.add_argument("--clients", default="1,16", help="concurrent query clients (default 1,16)")
    p.add_argument("--upsert-clients", default="1,16",
                   help="concurrent upsert clients, each count into a fresh collection; the first one's load "
                        "is measured for memory and queried (default 1,16)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--groups", type=int, default=20, help="payload group count; filter selectivity = 1/groups")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef", type=int, default=64, help="ef_search")
    p.add_argument("--repeats", type=int, default=3, help="passes over the queries per row (median QPS)")
    p.add_argument("--collection", default="bench_collections")
    p.add_argument("--workdir", default=None, help="where qdrant-edge shards and the chroma data go (default /tmp)")
    p.add_argument("--out", default=None, help="write the markdown report here (and the raw figures to OUT.json)")
    g = p.add_argument_group("semcache")
    g.add_argument("--semcache-url", default=os.environ.get("SEMCACHE_URL"),
                   help="base URL of a running semcache, e.g. http://127.0.0.1:8080 (default $SEMCACHE_URL)")
    g.add_argument("--semcache-api-key", default=os.environ.get("SEMCACHE_API_KEY"),
                   help="sent as Authorization: Bearer and api-key (default $SEMCACHE_API_KEY)")
    g.add_argument("--semcache-pid", "--pid", type=int, default=None, help="semcache server pid, for its RSS")
    g.add_argument("--semcache-settle", type=float, default=0.0,
                   help="seconds to wait after semcache reports a load ready, before measuring (lets upkeep "
                        "freeze the live graph into a segment; start the server with a short "
                        "SEMCACHE_SWEEP_INTERVAL_MILLIS)")
    g = p.add_argument_group("qdrant-edge")
    g.add_argument("--qdrant-full-scan-kb", type=int, default=10000,
                   help="HnswIndexConfig.full_scan_threshold in KB (Qdrant's default 10000)")
    g.add_argument("--qdrant-search-threads", type=int, default=0,
                   help="EdgeConfig.max_search_threads (default: the engine's, = CPU count)")
    g = p.add_argument_group("chroma")
    g.add_argument("--chroma-url", default=None, help="use this running Chroma server instead of starting one")
    g.add_argument("--chroma-pid", type=int, default=None, help="pid of the --chroma-url server, for its RSS")
    g.add_argument("--chroma-port", type=int, default=0, help="port for the server this script starts")
    g.add_argument("--chroma-client", choices=["raw", "official"], default="raw",
                   help="raw: REST v2 with one keep-alive connection per thread (the same client path as "
                        "semcache, default); official: chromadb.HttpClient's collection.upsert/query")
    args = p.parse_args()
    args.clients = [int(x) for x in args.clients.split(",") if x]
    args.upsert_clients = [int(x) for x in args.upsert_clients.split(",") if x]
    systems = (args.systems.split(",") if args.systems else
               (["semcache"] if args.semcache_url else []) + ["qdrant-edge", "chroma"])
    for s in systems:
        if s not in ("semcache", "qdrant-edge", "chroma"):
            p.error(f"unknown system {s}")
    if "semcache" in systems and not args.semcache_url:
        p.error("semcache needs --semcache-url (or $SEMCACHE_URL)")
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)

    v, q, corpus = load_corpus(args)
    args.dim = v.shape[1]
    qgroup = np.arange(len(q)) % args.groups
    groups = np.arange(len(v)) % args.groups
    log(f"corpus {v.shape}, queries {q.shape}; computing exact ground truth")
    truth = ground_truth(v, q, groups, qgroup, args.k)

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "nproc": len(os.sched_getaffinity(0)),
            "mem": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "python": platform.python_version(), "numpy": np.__version__,
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
            "corpus": corpus, "n": len(v), "dim": args.dim, "n_queries": len(q), "groups": args.groups,
            "k": args.k, "m": args.m, "ef_construction": args.ef_construction, "ef": args.ef,
            "repeats": args.repeats, "clients": args.clients, "upsert_clients": args.upsert_clients}
    results = []
    classes = {"semcache": Semcache, "qdrant-edge": QdrantEdge, "chroma": Chroma}
    for name in systems:
        system = classes[name](args)
        log(f"=== {name}")
        try:
            results.append(bench_system(system, v, q, qgroup, truth, args))
        except Exception as e:  # noqa: BLE001 - one system failing must not lose the others' figures
            traceback.print_exc()
            results.append({"system": name, "version": system.version, "upsert": [], "queries": [],
                            "memory": None, "notes": system.notes, "error": f"{type(e).__name__}: {e}"})
    md = report(meta, results)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md, encoding="utf-8")
        Path(str(args.out) + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2),
                                                 encoding="utf-8")
        log(f"wrote {args.out} and {args.out}.json")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
