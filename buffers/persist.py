"""A buffer's state as files: its arrays cut into safetensors shards of bounded size, plus JSON.

``to_files(prefix, state, shard_bytes)`` -> ``{name: bytes}``; ``from_files`` reverses it.
Shards split the arrays along their first axis (one row = one kept sequence),
so no shard exceeds ``shard_bytes`` (but for a single row larger than that).
The caller (the checkpoint writer) records every file's sha256 in its manifest.
"""

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import safetensors.numpy


def to_files(prefix: str, state: dict[str, Any], shard_bytes: int = 64 << 20) -> dict[str, bytes]:
    arrays: dict[str, np.ndarray] = state["arrays"]
    rows = len(next(iter(arrays.values()))) if arrays else 0
    row_bytes = sum(a[:1].nbytes for a in arrays.values()) or 1
    per_shard = max(1, shard_bytes // row_bytes)
    n_shards = max(1, -(-rows // per_shard))
    files = {}
    for i in range(n_shards):
        part = {k: np.ascontiguousarray(a[i * per_shard : (i + 1) * per_shard]) for k, a in arrays.items()}
        files[f"{prefix}-{i:05d}-of-{n_shards:05d}.safetensors"] = safetensors.numpy.save(part)
    meta = dict(state["meta"], shards=sorted(files), rows=rows)
    files[f"{prefix}.json"] = json.dumps(meta, sort_keys=True).encode()
    return files


def from_files(prefix: str, read: Callable[[str], bytes]) -> dict[str, Any]:
    """The state written by ``to_files``; ``read(name)`` returns a file's verified bytes."""
    meta = json.loads(read(f"{prefix}.json"))
    parts = [safetensors.numpy.load(read(name)) for name in meta.pop("shards")]
    rows = meta.pop("rows")
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    if arrays and len(next(iter(arrays.values()))) != rows:
        raise ValueError(f"{prefix}: shards hold {len(next(iter(arrays.values())))} rows, the index says {rows}")
    return {"arrays": arrays, "meta": meta}


def buffer_digest(buffer) -> str:
    """sha256 over a buffer's kept sequences, counters and random state: equal digests, equal buffers."""
    h = hashlib.sha256()
    state = buffer.state_dict()
    for k in sorted(state["arrays"]):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state["arrays"][k]).tobytes())
    meta = {k: v for k, v in state["meta"].items() if k != "rng"}
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(json.dumps(state["meta"]["rng"], sort_keys=True).encode())
    return h.hexdigest()
