"""Renders a kustomization (deploy/kubernetes/overlays/*) to YAML on stdout, offline.

CI has no kustomize binary, so this implements the subset our kustomizations use:
`resources` (files, or directories with a kustomization.yaml), `labels` (metadata only),
`images` (newName/newTag), and `patches` as strategic merges (maps merge, lists of maps
merge by `name`). `kustomize build deploy/kubernetes/overlays/<x>` renders the same.

Usage: python render.py deploy/kubernetes/overlays/cpu > cpu.yaml
"""
import copy
import os
import sys

import yaml


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in base + patch):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, existing in enumerate(out):
                if existing["name"] == item["name"]:
                    out[i] = merge(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def containers(doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def build(directory):
    kust = load_docs(os.path.join(directory, "kustomization.yaml"))[0]
    docs = []
    for res in kust.get("resources", []):
        path = os.path.join(directory, res)
        docs.extend(build(path) if os.path.isdir(path) else load_docs(path))
    for patch_ref in kust.get("patches", []):
        for patch in load_docs(os.path.join(directory, patch_ref["path"])):
            key = (patch["kind"], patch["metadata"]["name"])
            matches = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == key]
            if not matches:
                sys.exit(f"patch {patch_ref['path']} matches no resource {key}")
            for i in matches:
                docs[i] = merge(docs[i], patch)
    for label in kust.get("labels", []):
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in kust.get("images", []):
        for d in docs:
            for c in containers(d):
                name = c["image"].split(":")[0]
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', 'latest')}"
    return docs


if __name__ == "__main__":
    yaml.safe_dump_all(build(sys.argv[1]), sys.stdout, sort_keys=False)
