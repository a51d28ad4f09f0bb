"""Strict offline validation of rendered Kubernetes manifests: core kinds through kubernetes-validate,
KubeRay and prometheus-operator kinds through the CRD schemas in tests/schemas/ (README there)."""

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

SCHEMAS = Path(__file__).parent / "schemas"
CRD_GROUPS = {"ray.io", "monitoring.coreos.com"}
KUBERNETES_VERSION = "1.30.0"  # the oldest version the chart supports: its fields exist in every newer one


def _list_map_keys(validator, keys, instance, schema):
    """``x-kubernetes-list-type: map``: no two items with the same keys, as the API server checks."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    defaults = (schema.get("items") or {}).get("properties", {})
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k, defaults.get(k, {}).get("default"))) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map key(s) {keys} = {', '.join(key)}")
            seen.add(key)


def _list_set(validator, kind, instance, schema):
    if kind == "set" and isinstance(instance, list):
        values = [json.dumps(v, sort_keys=True) for v in instance]
        if len(values) != len(set(values)):
            yield jsonschema.ValidationError("duplicate values in an x-kubernetes-list-type: set")


Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys,
                                                                      "x-kubernetes-list-type": _list_set})


@functools.cache
def crd_validator(api_version: str, kind: str) -> Any:
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{kind.lower()}-{group}-{version}.json"
    return Validator(json.loads(path.read_text())) if path.exists() else None


def prune_nulls(obj: Any) -> Any:
    """The API server drops ``field: null``; so does the check."""
    if isinstance(obj, dict):
        return {k: prune_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [prune_nulls(v) for v in obj]
    return obj


def validate(doc: dict[str, Any]) -> list[str]:
    """Every problem with one manifest, each as 'Kind/name: path: message' (empty: valid)."""
    doc = prune_nulls(doc)
    api, kind = str(doc.get("apiVersion", "")), doc.get("kind", "?")
    name = f"{kind}/{(doc.get('metadata') or {}).get('name', '?')}"
    if api.rpartition("/")[0] in CRD_GROUPS:
        v = crd_validator(api, kind)
        if v is None:
            return [f"{name}: no schema for {api} {kind}"]
        return [f"{name}: .{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        return [f"{name}: {e}"]
    return []


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The manifests of a chart's rendered templates (helm_python's {path: text}), empty documents left out."""
    return [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
