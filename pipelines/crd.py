"""Offline validation of custom resources (TrainJob, TrainingRuntime) against their CRD schemas.

The API server prunes fields a structural schema does not declare, silently.  ``strict=True``
therefore closes every declared object (``additionalProperties: false`` unless the schema preserves
unknown fields), so a misspelt field fails here instead of vanishing on the cluster.  CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


def load_crd_schemas(directory: str | Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(apiVersion, kind): openAPIV3Schema}`` for every CRD YAML file in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"CRD directory {directory} does not exist")
    schemas = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(directory.glob("*.yaml")):
        text = path.read_text()
        if "kind: CustomResourceDefinition" not in text:  # e.g. Helm templates beside the CRDs
            continue
        for doc in yaml.load_all(text, Loader=loader):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    if not schemas:
        raise ValueError(f"no CustomResourceDefinition found in {directory}/*.yaml")
    return schemas


def _closed(schema: Any) -> Any:
    """Copy of ``schema`` in which objects with declared properties reject undeclared ones."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    # Under "properties" the keys are field names, not schema keywords: recurse into the values only.
    out = {key: ({name: _closed(sub) for name, sub in value.items()} if key == "properties" else _closed(value))
           for key, value in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def validate_custom_resource(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]],
                             strict: bool = True) -> None:
    """Raise ``ValueError`` naming the resource and field path when ``obj`` breaks its CRD schema."""
    import jsonschema

    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key not in schemas:
        raise ValueError(f"no CRD schema for apiVersion={key[0]!r} kind={key[1]!r}; known: {sorted(schemas)}")
    schema = copy.deepcopy(schemas[key])
    if strict:
        schema = _closed(schema)
        # The CRD leaves metadata open (type: object); the API server checks it, so do not close it.
        schema["properties"]["metadata"] = {"type": "object"}
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        name = (obj.get("metadata") or {}).get("name", "?")
        lines = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10]]
        raise ValueError(f"{key[1]} {name!r} does not match its CRD schema:\n  " + "\n  ".join(lines))
