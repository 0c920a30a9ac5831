"""Append-only audit log of a datasite, hash-chained and keyed so that a change is detectable.

Three layers, each against a different move of someone who can write the database (the
``site.db`` file, or the PostgreSQL tables) but cannot read the site directory's key file:

* triggers in the schema refuse UPDATE and DELETE (a plain SQL client is stopped there);
* each entry carries an HMAC-SHA256, under ``audit.key`` (0600, in the site directory, never in
  the database), of its fields and of the previous entry's MAC: an edited, forged, removed or
  moved row breaks the chain, and a chain rebuilt without the key does not verify;
* ``audit.head`` beside the key holds the sequence number and MAC of the newest entry written:
  a chain cut short at its end (the last rows deleted) still verifies link by link, and only an
  anchor outside the database shows that something is missing.

Someone who can also read the key can rewrite all three; that needs an outside witness (copy the
head line elsewhere), which this module does not provide.

Logs written before the key existed keep their plain SHA-256 links as a prefix: the head taken
when the key is created covers them, and every entry after it must carry the MAC.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from datasites.ledger.store import SiteStore

GENESIS = "0" * 64
KEY_FILE = "audit.key"
HEAD_FILE = "audit.head"


def _digest(prev: str, fields: list[Any]) -> str:
    """The unkeyed link of logs written before ``audit.key`` (anyone can compute it)."""
    return hashlib.sha256(json.dumps([prev, *fields], sort_keys=True).encode()).hexdigest()


def _mac(key: bytes, prev: str, fields: list[Any]) -> str:
    payload = json.dumps([prev, *fields], sort_keys=True).encode()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


class AuditLog:
    """Who did what to which request, when, with a hash of the code concerned.

    ``home``: the site directory that holds the key and the head; by default the directory of
    a SQLite ``site.db``. A PostgreSQL store must be given it (the database is elsewhere).
    """

    def __init__(self, store: SiteStore, home: Path | None = None) -> None:
        if home is None and store.postgres:
            raise ValueError("an audit log in PostgreSQL needs the site directory for its key")
        self.store = store
        self.home = Path(home) if home is not None else Path(store.path).parent

    def record(
        self,
        actor: str,
        event: str,
        request_id: str | None = None,
        code_hash: str | None = None,
        **detail: Any,
    ) -> None:
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        body = json.dumps(detail, sort_keys=True, default=str)
        with self.store.immediate() as conn:
            row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            prev = row[1] if row else GENESIS
            key = self._key() or self._create_key(int(row[0]) if row else 0, prev)
            digest = _mac(key, prev, [at, actor, event, request_id, code_hash, body])
            inserted = conn.execute(
                "INSERT INTO audit (at, actor, event, request_id, code_hash, detail, prev_hash,"
                " hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (at, actor, event, request_id, code_hash, body, prev, digest),
            ).fetchone()
            assert inserted is not None  # RETURNING gives the row just written
            seq = inserted[0]
        self._advance_head(
            int(seq), digest
        )  # after the commit: a crash leaves it behind, not ahead

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first; a detail that is not JSON (a forged row) is shown raw."""
        out = []
        for entry in self._rows():
            try:
                entry["detail"] = json.loads(entry["detail"])
            except (TypeError, ValueError):
                entry["detail"] = {"unreadable": entry["detail"]}
            out.append(entry)
        return out

    def verify(self) -> bool:
        """True when every entry matches its MAC and its predecessor, up to the head."""
        return self.problem() is None

    def problem(self) -> str | None:
        """What is wrong with the log, in one line (None when it verifies)."""
        key, head = self._key(), self._head()
        if key is None and head is not None:
            return f"its key file {KEY_FILE} is missing"
        if key is not None and head is None:
            return f"its anchor file {HEAD_FILE} is missing"
        prev, keyed, macs = GENESIS, False, {0: GENESIS}
        for e in self._rows():
            fields = [e["at"], e["actor"], e["event"], e["request_id"], e["code_hash"], e["detail"]]
            if e["prev_hash"] != prev:
                return (
                    f"entry {e['seq']} does not follow the one before it (a row was removed, "
                    "inserted or moved)"
                )
            after_head = head is not None and e["seq"] > head[0]
            if key is not None and hmac.compare_digest(str(e["hash"]), _mac(key, prev, fields)):
                keyed = True
            elif keyed or after_head or e["hash"] != _digest(prev, fields):
                return f"entry {e['seq']} does not match its MAC (edited or forged)"
            prev = e["hash"]
            macs[e["seq"]] = prev
        if head is not None and macs.get(head[0]) != head[1]:
            return (
                f"entry {head[0]}, the newest written, is gone or changed (rows were removed "
                "from the end)"
            )
        return None

    def _rows(self) -> list[dict[str, Any]]:
        with self.store.connect() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq").fetchall()]

    def _key(self) -> bytes | None:
        try:
            return bytes.fromhex((self.home / KEY_FILE).read_text().strip())
        except FileNotFoundError:
            return None

    def _create_key(self, seq: int, last: str) -> bytes:
        """A new key, with the head at the newest entry so far (called under the write lock)."""
        key = secrets.token_bytes(32)
        _write_new(self.home / HEAD_FILE, f"{seq} {last}\n")
        _write_new(self.home / KEY_FILE, key.hex() + "\n")
        return self._key() or key

    def _head(self) -> tuple[int, str] | None:
        try:
            seq, mac = (self.home / HEAD_FILE).read_text().split()
            return int(seq), mac
        except FileNotFoundError:
            return None
        except ValueError:
            return (-1, "unreadable")  # matches no entry: the log fails to verify

    def _advance_head(self, seq: int, mac: str) -> None:
        """Move the head to ``seq`` unless a later entry's writer got there first."""
        with open(self.home / (HEAD_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._head()
            if current is not None and current[0] >= seq:
                return
            tmp = self.home / (HEAD_FILE + ".tmp")
            tmp.write_text(f"{seq} {mac}\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.home / HEAD_FILE)


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` (0600) with ``text`` unless it exists: never overwrite a key or head."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
