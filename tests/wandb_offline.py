"""Read the records of an offline W&B run file (``run-*.wandb``) without a network or a W&B server.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
header (crc32 4, length 2, type 1: full / first / middle / last); chunks join into protobuf Records.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(path) -> list[dict]:
    """Every logged row, values decoded from JSON."""
    return [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records(path) if r.HasField("history")]


def config(path) -> dict:
    out = {}
    for r in records(path):
        if r.HasField("config"):
            out.update({_key(i): json.loads(i.value_json) for i in r.config.update})
    return out
