"""The records a peer must not lose when the whole swarm goes down: a local, append-only journal.

The DHT lives in the peers' memory. If every peer of a job dies, the job record, the rounds'
progress and the result die with them, though each peer still has the models on disk. So each
peer journals the records that define a job's history, *its own* (it can sign them again):
the job record if it took the submission, its merged progress records (the checkpoints: each
names the round's model, which every group member keeps in its blob store) and its result
record. At start, the peer publishes its journal again; when the swarm's peers are back, the
rounds they had finished are readable again and the job resumes after the last of them.

Only finished rounds are journaled: a round that was under way when the swarm died is simply
run again from its start; no merged round is ever redone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from dht.records import RECORD_KINDS, KIND_OF, MalformedRecord, _Body
from dht.store import RecordStore

logger = logging.getLogger(__name__)


class RecordJournal:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def remember(self, key: str, body: _Body, *, ttl: float, subkey_prefix: bytes = b"") -> None:
        entry = {"key": key, "kind": KIND_OF[type(body)], "body": body.model_dump(mode="json"),
                 "subkey_prefix": subkey_prefix.hex(), "expires_at": time.time() + ttl}
        line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:  # one write per line: a crash can cut only the last one
                f.write(line)

    def entries(self) -> list[tuple[str, _Body, float, bytes]]:
        """What to publish again: (key, body, expires_at, subkey_prefix), the latest per record."""
        if not self.path.exists():
            return []
        latest: dict[tuple[str, str, str], tuple[str, _Body, float, bytes]] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
                body = RECORD_KINDS[entry["kind"]].model_validate(entry["body"])
                item = (entry["key"], body, float(entry["expires_at"]), bytes.fromhex(entry["subkey_prefix"]))
            except (ValueError, KeyError, TypeError, MalformedRecord) as e:
                logger.warning(f"{self.path}:{number}: skipping an unreadable journal line ({e})")
                continue
            latest[(item[0], entry["kind"], entry["subkey_prefix"])] = item
        return list(latest.values())

    def replay(self, records: RecordStore) -> int:
        """Publish every live journaled record again (signed afresh); returns how many."""
        published = 0
        for key, body, expires_at, subkey_prefix in self.entries():
            ttl = expires_at - time.time()
            if ttl > 0 and body.peer_id == records.peer_id:
                published += bool(records.publish(key, body, ttl=ttl, subkey_prefix=subkey_prefix))
        return published
