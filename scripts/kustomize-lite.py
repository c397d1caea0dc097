#!/usr/bin/env python3
"""Renders a kip Kustomize overlay without the kustomize binary (fallback for
scripts/check-deploy.sh on machines without kubectl).

Supports exactly the subset kip's deploy/k8s uses: `resources` (files and directories with a
kustomization.yaml), `namespace`, `images` (newName/newTag) and `patches` with `path`
(strategic merge: maps merge, lists of maps with `name` merge by name, other lists replace).
Anything else in a kustomization.yaml is an error, so the fallback can never silently render
something different from kustomize. check-deploy.sh compares both renderers where kubectl
exists.
"""
import copy
import os
import sys

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def key(doc):
    return (doc.get("kind"), doc["metadata"]["name"])


def merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        for p in patch:
            for i, b in enumerate(out):
                if b["name"] == p["name"]:
                    out[i] = merge(b, p)
                    break
            else:
                out.append(copy.deepcopy(p))
        return out
    return copy.deepcopy(patch)


def set_images(node, images):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "image" and isinstance(v, str):
                name = v.split("@")[0].rsplit(":", 1)[0] if ":" in v.split("/")[-1] else v
                for img in images:
                    if img["name"] == name:
                        node[k] = f'{img.get("newName", name)}:{img["newTag"]}' if "newTag" in img \
                            else img.get("newName", name)
            else:
                set_images(v, images)
    elif isinstance(node, list):
        for x in node:
            set_images(x, images)


def build(directory):
    kfile = os.path.join(directory, "kustomization.yaml")
    with open(kfile, encoding="utf-8") as f:
        k = yaml.safe_load(f)
    unknown = set(k) - SUPPORTED
    if unknown:
        sys.exit(f"kustomize-lite: {kfile}: unsupported fields {sorted(unknown)}; use kubectl kustomize")
    docs = []
    for res in k.get("resources", []):
        path = os.path.join(directory, res)
        docs.extend(build(path) if os.path.isdir(path) else load_docs(path))
    for p in k.get("patches", []):
        if set(p) != {"path"}:
            sys.exit(f"kustomize-lite: {kfile}: only `patches: - path:` is supported")
        for patch in load_docs(os.path.join(directory, p["path"])):
            matches = [i for i, d in enumerate(docs) if key(d) == key(patch)]
            if not matches:
                sys.exit(f"kustomize-lite: patch target {key(patch)} not found")
            for i in matches:
                docs[i] = merge(docs[i], patch)
    if "namespace" in k:
        for d in docs:
            if d["kind"] == "Namespace":
                d["metadata"]["name"] = k["namespace"]
            elif d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]
    if "images" in k:
        set_images(docs, k["images"])
    return docs


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: kustomize-lite.py DIR")
    yaml.safe_dump_all(build(sys.argv[1]), sys.stdout, sort_keys=True, explicit_start=False)


if __name__ == "__main__":
    main()
