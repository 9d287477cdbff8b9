"""Checks of a coral-torch remote made with plain boto3, json and xxhash, independent of coral-torch's
own reading code: document checksums, commit ids, object payloads and delta bases."""

from __future__ import annotations

import json
from typing import Optional

import xxhash


def sealed(body: bytes) -> Optional[dict]:
    """The document if it parses and its doc_xxh3 matches (checked here, not by coral-torch)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "doc_xxh3" not in doc:
        return None
    recorded = doc.pop("doc_xxh3")
    canon = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return doc if xxhash.xxh3_128(canon).hexdigest() == recorded else None


def remote_problems(client, bucket: str, prefix: str) -> tuple[list[str], dict[str, str], int]:
    """(what breaks the invariant, {ref name: commit} of intact refs, number of damaged documents)."""
    keys: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []) or []:
            keys[o["Key"][len(prefix):]] = o["Size"]

    def get(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=prefix + key)["Body"].read()

    checked: dict[str, Optional[str]] = {}

    def object_problem(h: str, depth: int = 0) -> Optional[str]:
        if h in checked:
            return checked[h]
        problem = None
        if depth > 100:
            problem = "delta chain too long"
        elif f"metadata/{h}.json" in keys or f"metadata/{h}.delta.json" in keys:
            delta = f"metadata/{h}.json" not in keys
            doc = sealed(get(f"metadata/{h}.delta.json" if delta else f"metadata/{h}.json"))
            payload_key = f"{'deltas' if delta else 'weights'}/{h}"
            if doc is None:
                problem = "damaged metadata"
            elif payload_key not in keys:
                problem = "payload missing"
            else:
                payload = get(payload_key)
                if len(payload) != doc["payload_bytes"] or xxhash.xxh3_64(payload).hexdigest() != doc["payload_xxh3"]:
                    problem = "damaged payload"
                elif delta:
                    problem = object_problem(str(doc["reference_hash"]), depth + 1)
        else:
            problem = "missing"
        checked[h] = problem
        return problem

    problems: list[str] = []
    damaged_docs = 0
    intact_commits = set()
    for k in keys:
        if k.startswith("commits/") and k.endswith(".json"):
            cid = k[len("commits/"):-len(".json")]
            doc = sealed(get(k))
            manifest = json.dumps(doc["manifest"], sort_keys=True, separators=(",", ":")).encode() if doc else b""
            if doc is None or xxhash.xxh3_128(manifest).hexdigest() != cid:
                damaged_docs += 1  # allowed after a refused push: a re-push rewrites it
                continue
            intact_commits.add(cid)
            for name, h, _ in doc["objects"]:
                p = object_problem(h)
                if p is not None:
                    problems.append(f"commit {cid[:10]} needs {name} ({h[:10]}): {p}")
    refs: dict[str, str] = {}
    for k in keys:
        if k.startswith("refs/") and k.endswith(".json"):
            doc = sealed(get(k))
            if doc is None:
                damaged_docs += 1
                continue
            refs[k[len("refs/"):-len(".json")]] = doc["commit"]
            if doc["commit"] not in intact_commits:
                problems.append(f"{k} names commit {doc['commit'][:10]}: no intact commit document")
    return problems, refs, damaged_docs
