#!/usr/bin/env python3
"""Validate Kubernetes custom resources offline against published CRD schemas.

Usage: python deploy/validate_crds.py CRD_DIR FILE.yaml [FILE.yaml ...]

Loads every CustomResourceDefinition in CRD_DIR/*.yaml|*.yml, then checks each
document of the given files whose apiVersion group and kind match a CRD:
  * the apiVersion's version must be one the CRD serves;
  * the document must satisfy that version's schema.openAPIV3Schema (JSON
    Schema 2020-12 via the `jsonschema` package), made strict like
    `kubectl apply --validate=strict`: every object schema on a
    properties/items/additionalProperties path that has no
    additionalProperties and no x-kubernetes-preserve-unknown-fields: true gets
    additionalProperties: false, so misspelt or unknown fields fail (objects
    with no properties at all, e.g. `disable: {}`, thus accept no fields,
    which is what the API server's pruning does too);
  * root `metadata` may be any object (ObjectMeta itself is not checked),
    and root apiVersion/kind are always allowed;
  * x-kubernetes-int-or-string accepts an integer or a string;
  * a field that is both required and has a default may be omitted, because
    the API server applies defaults before it validates.
Not checked: CEL rules (x-kubernetes-validations), other x-kubernetes-*
semantics (list-type set/map uniqueness, map-type, embedded-resource),
`format` (int32, date-time, ...), ObjectMeta, defaults, and anything the
controller itself rejects later. A pass here is necessary, not sufficient.

Documents of kinds no CRD defines (Service, ConfigMap, ...) are skipped.
Exit status: 0 all valid, 1 a document is invalid, 2 usage error.
"""
import pathlib
import sys

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

def strict(schema, close=True):
    """Return a JSON Schema copy of a CRD structural schema, closed as above.

    `close` is False under allOf/anyOf/oneOf/not: those branches may name only
    some of the properties, so closing them would reject valid objects.
    """
    if not isinstance(schema, dict):
        return schema  # e.g. additionalProperties: true
    out = {}
    for key, val in schema.items():
        if key.startswith("x-kubernetes-"):
            # Ignored, int-or-string and preserve-unknown-fields aside (below).
            # CEL rules (x-kubernetes-validations) are NOT checked.
            continue
        if key == "properties":
            out[key] = {name: strict(sub, close) for name, sub in val.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = strict(val, close)
        elif key == "not":
            out[key] = strict(val, False)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [strict(sub, False) for sub in val]
        else:  # keywords with literal values: type, enum, default, pattern...
            out[key] = val
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    for bound in ("minimum", "maximum"):  # OpenAPI 3.0 boolean exclusive* form
        excl = "exclusive" + bound.capitalize()
        if isinstance(out.get(excl), bool) and out.pop(excl) and bound in out:
            out[excl] = out.pop(bound)
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "required" in out:  # the API server defaults these before validating
        props = schema.get("properties", {})
        out["required"] = [r for r in out["required"] if "default" not in props.get(r, {})]
    is_object = schema.get("type") == "object" or "properties" in schema
    if (close and is_object and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def load_crds(crd_dir):
    """Map (group, kind) -> (CRD name, {served version: validator})."""
    crds = {}
    for path in sorted(p for p in crd_dir.iterdir() if p.suffix in (".yaml", ".yml")):
        try:
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    spec, versions = doc["spec"], {}
                    for ver in (v for v in spec["versions"] if v.get("served", True)):
                        schema = strict(ver["schema"]["openAPIV3Schema"])
                        props = schema.setdefault("properties", {})
                        props["metadata"] = {"type": "object"}  # ObjectMeta is not checked
                        for key in ("apiVersion", "kind"):  # always allowed at the root
                            props.setdefault(key, {"type": "string"})
                        Draft202012Validator.check_schema(schema)
                        versions[ver["name"]] = Draft202012Validator(schema)
                    crds[(spec["group"], spec["names"]["kind"])] = (doc["metadata"]["name"], versions)
        except (yaml.YAMLError, KeyError, TypeError, SchemaError) as e:
            raise ValueError(f"cannot load CRDs from {path}: {type(e).__name__}: {e}"[:600]) from e
    return crds


def documents(path):
    """Yield (index, document); the items of a `kind: List` count as documents."""
    for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
        if isinstance(doc, dict) and doc.get("kind") == "List":
            yield from ((f"{i}.{j}", item) for j, item in enumerate(doc.get("items") or []))
        elif doc is not None:
            yield str(i), doc


def check(crds, where, doc):
    """Print one verdict line (or one line per error); return False if invalid."""
    if not isinstance(doc, dict):
        print(f"invalid: {where}: document is not a mapping")
        return False
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "<no name>")
    group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
    if (group, kind) not in crds:
        print(f"skipped: {kind} {name} (no CRD)")
        return True
    crd_name, versions = crds[(group, kind)]
    where = f"{kind} {name} ({where})"
    if version not in versions:
        print(f"invalid: {where}: {doc.get('apiVersion')} is not served by {crd_name} "
              f"(served: {', '.join(versions)})")
        return False
    errors = sorted(versions[version].iter_errors(doc), key=lambda e: [str(p) for p in e.path])
    for err in errors:
        msg = err.message if len(err.message) < 300 else err.message[:300] + "..."
        print(f"invalid: {where}: {err.json_path}: {msg}")
    if not errors:
        print(f"valid: {kind} {name} ({crd_name} {version})")
    return not errors


def main(argv):
    if len(argv) < 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    crd_dir, files = pathlib.Path(argv[1]), [pathlib.Path(a) for a in argv[2:]]
    missing = [p for p in [crd_dir, *files] if not (p.is_dir() if p is crd_dir else p.is_file())]
    if missing:
        print(f"error: not found: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    try:
        crds = load_crds(crd_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not crds:
        print(f"error: no CustomResourceDefinition in {crd_dir}", file=sys.stderr)
        return 2
    ok = True
    for f in files:
        try:
            docs = list(documents(f))
        except yaml.YAMLError as e:
            print(f"invalid: {f}: YAML error: {e}")
            ok = False
            continue
        for idx, doc in docs:
            ok = check(crds, f"{f}#{idx}", doc) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
