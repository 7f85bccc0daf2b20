"""Keep one version of a CustomResourceDefinition, as compact JSON, for validating manifests offline.

    python infra/schemas/trim_crd.py ray.io_rayclusters.yaml v1 > infra/schemas/kuberay-v1.7.0/ray.io_rayclusters.v1.json

The output is still a CustomResourceDefinition (apiextensions.k8s.io/v1) with only that version in
`spec.versions` (and no printer columns): its `schema.openAPIV3Schema` is what the API server checks.
"""

from __future__ import annotations

import json
import sys

import yaml


def trim(crd: dict, version: str) -> dict:
    """The CRD with `spec.versions` cut down to `version`, whose printer columns are dropped."""
    kept = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not kept:
        raise SystemExit(f"{crd['metadata']['name']} has no version {version!r}")
    entry = {k: kept[0][k] for k in ("name", "served", "storage", "schema", "subresources") if k in kept[0]}
    spec = {k: crd["spec"][k] for k in ("group", "names", "scope")}
    return {
        "apiVersion": crd["apiVersion"],
        "kind": crd["kind"],
        "metadata": {"name": crd["metadata"]["name"]},
        "spec": {**spec, "versions": [entry]},
    }


def main(argv: list[str]) -> None:
    path, version = argv
    with open(path, encoding="utf-8") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    json.dump(trim(crd, version), sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
