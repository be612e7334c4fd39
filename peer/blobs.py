"""A content-addressed blob store on the peer's disk: shards, manifests, models, reports.

A blob's id is the sha256 of its bytes. Writes go to a temporary file first and are renamed into
place, so a crash mid-write never leaves a blob whose bytes do not match its name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, blob_id: str) -> Path:
        return self.root / blob_id[:2] / blob_id

    def has(self, blob_id: str) -> bool:
        return self.path(blob_id).exists()

    def put(self, data: bytes, expected_id: str | None = None) -> str:
        blob_id = hashlib.sha256(data).hexdigest()
        if expected_id is not None and blob_id != expected_id:
            raise ValueError(f"blob {expected_id[:12]}: content hash mismatch (got {blob_id[:12]})")
        target = self.path(blob_id)
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return blob_id

    def get(self, blob_id: str) -> bytes:
        return self.path(blob_id).read_bytes()

    def size(self, blob_id: str) -> int:
        return self.path(blob_id).stat().st_size

    def discard(self, blob_id: str) -> int:
        """Delete a blob if held; returns the bytes freed."""
        try:
            size = self.size(blob_id)
            self.path(blob_id).unlink()
            return size
        except FileNotFoundError:
            return 0

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("??/*") if not p.name.startswith("."))
