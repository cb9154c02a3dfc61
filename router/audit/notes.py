"""What the router tells its audit trail about itself: start, stop, policy loads,
certificate changes.

An auditor reading a decision needs its context: which configuration and which
certificates the router ran with, which policy was live and who signed it, which
reload was refused and why. These notes put that context into the same hash chain as
the decisions, at the point in the chain where it took effect.

Certificates are described by fingerprints, never by content; key files by the
fingerprint of their *public* key. The router's configuration is summarised and
hashed (its token entries are already hashes), so a changed configuration shows up as
`config_changed` in the next start record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from hybridroute import __version__
from hybridroute.certs.credentials import (
    CredentialsError,
    load_certificates,
    load_private_key,
    public_der,
)
from hybridroute.filestamp import stamp
from hybridroute.router.audit.db import connect_readonly, newest_signed_policy_note
from hybridroute.router.audit.events import AuditNote
from hybridroute.router.config import RouterConfig
from hybridroute.router.policy.signing import PolicySignature
from hybridroute.router.policy.store import ReloadResult

__all__ = ["CertWatch", "newest_signed_policy", "policy_note", "start_note", "stop_note"]

log = logging.getLogger(__name__)

_KEYS = frozenset({"tls.key", "upstream.key"})


def _files(config: RouterConfig) -> dict[str, Path]:
    """The TLS files the router reads, by role."""
    out: dict[str, Path | None] = {}
    if config.tls is not None:
        out |= {"tls.cert": config.tls.cert, "tls.key": config.tls.key}
        out["tls.client_ca"] = config.tls.client_ca
    up = config.upstream
    out |= {"upstream.ca": up.ca, "upstream.cert": up.cert, "upstream.key": up.key}
    out["upstream.cloud_ca"] = up.cloud_ca
    return {role: path for role, path in out.items() if path is not None}


def fingerprint(role: str, path: Path) -> dict[str, object]:
    """A certificate's SHA-256 fingerprint and identity, or a key's public fingerprint."""
    try:
        if role in _KEYS:
            der = public_der(load_private_key(path).public_key())
            return {"public_key_sha256": hashlib.sha256(der).hexdigest()}
        certs = load_certificates(path)
    except (CredentialsError, OSError, ValueError) as exc:
        return {"error": str(exc)[:300]}
    leaf = certs[0]
    cn = [a.value for a in leaf.subject if a.oid.dotted_string == "2.5.4.3"]
    return {
        "sha256": leaf.fingerprint(hashes.SHA256()).hex(),
        "subject_cn": str(cn[0]) if cn else "",
        "serial": f"{leaf.serial_number:x}",
        "not_after": leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "certificates": len(certs),
    }


class CertWatch:
    """Notices when a TLS file changes on disk (a stat per file per poll; the files
    are parsed only when one changed) and says what it changed from and to. A file
    that could not be read is read again once chmod or chown fixes it (the ctime)."""

    def __init__(self, config: RouterConfig) -> None:
        self._files = _files(config)
        self._stamps = {role: stamp(path) for role, path in self._files.items()}
        self.current = {role: fingerprint(role, p) for role, p in self._files.items()}

    def changes(self) -> list[AuditNote]:
        notes = []
        for role, path in self._files.items():
            seen = stamp(path)
            if seen == self._stamps[role]:
                continue
            self._stamps[role] = seen
            now = fingerprint(role, path)
            if now != self.current[role]:
                fields = {"role": role, "path": str(path), "before": self.current[role]}
                notes.append(AuditNote("cert.change", {**fields, "after": now}))
                self.current[role] = now
        return notes


def config_hash(config: RouterConfig) -> str:
    data = config.model_dump(mode="json")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def start_note(
    config: RouterConfig,
    port: int | None,
    certs: Mapping[str, object],
    audit: Mapping[str, object],
    previous: Mapping[str, object] | None,
) -> AuditNote:
    digest = config_hash(config)
    changed = None if previous is None else previous.get("config_sha256") != digest
    return AuditNote(
        "router.start",
        {
            "version": __version__,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "listen": config.listen,
            "port": port,
            "token_listen": config.token_listen,
            "insecure": config.tls is None,
            "config_sha256": digest,
            "config_changed": changed,
            "token_callers": sorted({t.caller for t in config.tokens}),
            "admins": list(config.admins),
            "require_signed_policy": config.require_signed_policy,
            "certs": dict(certs),
            "audit": dict(audit),
        },
    )


def stop_note(uptime_seconds: float, why: str) -> AuditNote:
    return AuditNote("router.stop", {"uptime_ms": round(uptime_seconds * 1000), "why": why})


def newest_signed_policy(db: Path) -> PolicySignature | None:
    """The newest signed policy the router writing `db` accepted, from its policy
    notes, or kept by a prune that removed them (None: no trail yet, or no signed
    policy in it). Its floor for rollbacks: see `policy.store`. The trail is
    hash-chained, so removing these records to lower the floor shows in `hybridroute
    audit verify`."""
    if not db.is_file():
        return None
    try:
        with contextlib.closing(connect_readonly(db)) as conn:
            note = newest_signed_policy_note(conn)
    except sqlite3.Error as exc:  # opening the trail will say what is wrong
        log.warning("audit trail %s: cannot read its policy records (%s)", db, exc)
        return None
    return None if note is None else _signature(note)


def _signature(note: Mapping[str, object]) -> PolicySignature | None:
    fields = (note.get("signed_by"), note.get("signing_key"), note.get("policy"))
    signed_at = note.get("signed_at_us")
    if note.get("accepted") is not True or not isinstance(signed_at, int):
        return None
    if not all(isinstance(f, str) for f in fields):
        return None
    signer, key, policy = (str(f) for f in fields)
    return PolicySignature(signer, key, signed_at / 1e6, policy)


def policy_note(result: ReloadResult) -> AuditNote:
    """`policy.load` (at start) or `policy.reload`, accepted or refused with its error."""
    fields: dict[str, object] = {
        "accepted": result.accepted,
        "why": result.why,
        "path": result.path,
        "policy": result.version_hash,
        "error": result.error,
        "signed_by": result.signed_by,
        "signing_key": result.signing_key,
        "signed_at_us": None if result.signed_at is None else round(result.signed_at * 1e6),
    }
    kind = "policy.load" if result.why == "start" else "policy.reload"
    clean = {k: v for k, v in fields.items() if v is not None and v != ""}
    return AuditNote(kind, clean, time=result.at)
