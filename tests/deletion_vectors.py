"""Deletion vectors written into a local Delta table's log, as Spark and Databricks write them (delta-rs reads them but
does not write them): a DELETE that marks rows of a data file deleted in place instead of rewriting it. The bitmap
is Roaring's portable serialization (array containers), behind the Delta magic number; stored inline in the log
(`storageType` "i", Z85 text) or in a `deletion_vector_<uuid>.bin` file beside the data ("u": a version byte, then
per vector its size, the bitmap and its CRC-32)."""
from __future__ import annotations

import json
import struct
import uuid
import zlib
from pathlib import Path

Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
MAGIC = 1681511377          # RoaringBitmapArray's portable format
NO_RUN_COOKIE = 12346       # a 32-bit Roaring bitmap without run containers


def z85(data: bytes) -> str:
    """ZeroMQ's base-85 text of `data`, padded with zero bytes to a multiple of 4."""
    data += b"\0" * (-len(data) % 4)
    out = []
    for i in range(0, len(data), 4):
        value, chars = int.from_bytes(data[i:i + 4], "big"), []
        for _ in range(5):
            value, digit = divmod(value, 85)
            chars.append(Z85[digit])
        out += reversed(chars)
    return "".join(out)


def bitmap(positions: list[int]) -> bytes:
    """The Delta serialization of a set of row positions (under 2**32, at most 4096 per 65536-row block)."""
    values = sorted(set(positions))
    keys = sorted({v >> 16 for v in values})
    blocks = {k: [v & 0xFFFF for v in values if v >> 16 == k] for k in keys}
    head = struct.pack("<II", NO_RUN_COOKIE, len(keys)) + b"".join(
        struct.pack("<HH", k, len(blocks[k]) - 1) for k in keys)
    offsets, body, start = b"", b"", len(head) + 4 * len(keys)
    for k in keys:
        offsets += struct.pack("<I", start + len(body))
        body += struct.pack(f"<{len(blocks[k])}H", *blocks[k])
    return struct.pack("<iqI", MAGIC, 1, 0) + head + offsets + body     # one bitmap, for the high 32 bits 0


def latest_add(commits: list[str], name: str) -> dict:
    """The newest add action, in a table's commits (their JSON texts, oldest first), of the file whose path ends with
    `name`."""
    found = None
    for commit in commits:
        for line in commit.splitlines():
            action = json.loads(line)
            if "add" in action and action["add"]["path"].endswith(name):
                found = action["add"]
    assert found is not None, name
    return found


def inline_vector(positions: list[int]) -> dict:
    """A deletion vector stored in the log itself."""
    data = bitmap(positions)
    return {"storageType": "i", "pathOrInlineDv": z85(data), "sizeInBytes": len(data),
            "cardinality": len(set(positions))}


def vector_in_a_file(positions: list[int]) -> tuple[dict, str, bytes]:
    """A deletion vector stored in a file beside the data: the descriptor, the file's name and its bytes."""
    data, key = bitmap(positions), uuid.uuid4()
    blob = b"\x01" + struct.pack(">I", len(data)) + data + struct.pack(">I", zlib.crc32(data))
    return ({"storageType": "u", "pathOrInlineDv": z85(key.bytes), "offset": 1, "sizeInBytes": len(data),
             "cardinality": len(set(positions))}, f"deletion_vector_{key}.bin", blob)


def deletion_commit(old: dict, vector: dict) -> str:
    """The commit of a DELETE that marks rows of `old`'s file deleted by `vector` (its protocol gaining the
    deletionVectors feature): remove the file as it was, add it with the vector."""
    actions = [{"protocol": {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": ["deletionVectors"],
                             "writerFeatures": ["deletionVectors"]}},
               {"remove": {"path": old["path"], "deletionTimestamp": 1, "dataChange": True,
                           "extendedFileMetadata": True, "partitionValues": old["partitionValues"],
                           "size": old["size"], **({"deletionVector": old["deletionVector"]}
                                                   if old.get("deletionVector") else {})}},
               {"add": {**old, "deletionVector": vector, "dataChange": True}}]
    return "\n".join(json.dumps(a) for a in actions) + "\n"


def delete_in_place(table: Path, name: str, positions: list[int], inline: bool = True) -> None:
    """Commit, to the local Delta table at `table`, a DELETE of the rows at `positions` of the data file whose path
    ends with `name`, as a deletion vector (inline in the log, or in a file beside the data)."""
    commits = sorted((table / "_delta_log").glob("*.json"))
    old = latest_add([c.read_text() for c in commits], name)
    if inline:
        vector = inline_vector(positions)
    else:
        vector, file_name, blob = vector_in_a_file(positions)
        (table / file_name).write_bytes(blob)
    (table / "_delta_log" / f"{len(commits):020d}.json").write_text(deletion_commit(old, vector))
