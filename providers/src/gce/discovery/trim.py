#!/usr/bin/env python3
"""Trims the Compute Engine v1 discovery document to the methods clusterctl calls.

Source: googleapiclient/discovery_cache/documents/compute.v1.json from the PyPI wheel
google-api-python-client 2.202.0 (google_api_python_client-2.202.0-py3-none-any.whl),
discovery revision 20261106.

Rerun (from the repository root), after unpacking the wheel somewhere, e.g. /tmp/gapi:

    python3 -m pip download --no-deps google-api-python-client==2.202.0 -d /tmp/gapi
    (cd /tmp/gapi && python3 -m zipfile -e google_api_python_client-2.202.0-py3-none-any.whl .)
    python3 providers/src/gce/discovery/trim.py \
        /tmp/gapi/googleapiclient/discovery_cache/documents/compute.v1.json

It writes compute-v1.json next to this script. The output keeps the top-level revision,
rootUrl, servicePath, baseUrl, version, name and parameters; the methods listed in METHODS;
and the schemas reachable ($ref, transitively) from their requests and responses. Every
`description` text is dropped (a property *named* "description" is kept: only string values
are documentation). Standard library only.
"""

import json
import os
import sys

TOP_LEVEL = ["revision", "rootUrl", "servicePath", "baseUrl", "version", "name", "parameters"]

METHODS = {
    "instances": [
        "insert", "get", "list", "delete", "start", "stop", "reset", "setLabels", "setMachineType",
        "setMetadata", "attachDisk", "detachDisk", "getGuestAttributes",
    ],
    "disks": ["insert", "get", "list", "delete"],
    "images": ["insert", "get", "list", "delete", "getFromFamily"],
    "networks": ["insert", "get", "list", "delete"],
    "subnetworks": ["get", "list"],
    "firewalls": ["insert", "get", "list", "delete"],
    "routes": ["insert", "get", "list", "delete"],
    "zoneOperations": ["get", "wait"],
    "globalOperations": ["get", "wait"],
    "zones": ["get"],
}


def strip_descriptions(node):
    """Returns a copy of node without any "description" key whose value is documentation text."""
    if isinstance(node, dict):
        return {
            k: strip_descriptions(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def refs(node, out):
    """Collects every "$ref" target under node into out."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                out.add(v)
            else:
                refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: trim.py path/to/compute.v1.json")
    with open(sys.argv[1], encoding="utf-8") as f:
        doc = json.load(f)

    out = {k: doc[k] for k in TOP_LEVEL}
    resources = {}
    roots = set()
    for resource, names in METHODS.items():
        methods = doc["resources"][resource]["methods"]
        kept = {}
        for name in names:
            if name not in methods:
                sys.exit(f"method {resource}.{name} is not in the document")
            method = methods[name]
            kept[name] = method
            for key in ("request", "response"):
                if key in method:
                    refs(method[key], roots)
        resources[resource] = {"methods": kept}
    out["resources"] = resources

    schemas = doc["schemas"]
    reachable = set()
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in reachable:
            continue
        if name not in schemas:
            sys.exit(f"schema {name} is referenced but not defined")
        reachable.add(name)
        found = set()
        refs(schemas[name], found)
        todo.extend(sorted(found - reachable))
    out["schemas"] = {name: schemas[name] for name in sorted(reachable)}

    out = strip_descriptions(out)
    target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compute-v1.json")
    with open(target, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {target}: {len(resources)} resources, "
          f"{sum(len(v) for v in METHODS.values())} methods, {len(reachable)} schemas")


if __name__ == "__main__":
    main()
