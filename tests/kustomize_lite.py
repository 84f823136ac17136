"""Renders the kustomize overlays in k8s/ for validation, without the kustomize binary (no registry here ships
it). It implements exactly what the overlays use: ``resources`` (files and directories with their own
kustomization), ``namespace`` for namespaced kinds, and JSON 6902 ``patches`` selected by kind and name.
``kubectl apply -k`` renders the same files on a real cluster."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

CLUSTER_SCOPED = {"RuntimeClass", "Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}


def render(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "namespace", "patches"}
    if unknown:
        raise ValueError(f"{directory}: kustomize fields this renderer does not know: {sorted(unknown)}")
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    docs = [copy.deepcopy(d) for d in docs]
    for patch in spec.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        if not hits:
            raise ValueError(f"{directory}: patch target {target} matches nothing")
        for doc in hits:
            patched = jsonpatch.apply_patch(doc, ops)
            doc.clear()
            doc.update(patched)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    return docs
