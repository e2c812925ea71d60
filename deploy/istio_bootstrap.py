"""Wraps the Envoy ext_proc filter that deploy/gateways/istio.yaml patches into Istio's
gateway in a minimal Envoy bootstrap (one listener, the cluster it names), so a real
Envoy can validate it: `python deploy/istio_bootstrap.py deploy/gateways/istio.yaml`.
"""
import json
import sys

import yaml

filters = []
for doc in yaml.safe_load_all(open(sys.argv[1], encoding="utf-8")):
    if doc and doc.get("kind") == "EnvoyFilter":
        for patch in doc["spec"]["configPatches"]:
            if patch["applyTo"] == "HTTP_FILTER":
                filters.append(patch["patch"]["value"])
if not filters:
    sys.exit("no HTTP_FILTER patch found")
cluster = filters[0]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
router = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
print(json.dumps({"static_resources": {
    "listeners": [{"name": "gateway", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
                   "filter_chains": [{"filters": [{
                       "name": "envoy.filters.network.http_connection_manager",
                       "typed_config": {
                           "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                           "stat_prefix": "gateway",
                           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                               {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
                           "http_filters": filters + [router]}}]}]}],
    "clusters": [{"name": cluster, "type": "STRICT_DNS", "connect_timeout": "1s",
                  "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                      "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                      "explicit_http_config": {"http2_protocol_options": {}}}},
                  "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {
                      "address": {"socket_address": {"address": "semcache-0.default.svc.cluster.local", "port_value": 9090}}}}]}]}}],
}}))
