"""The audit trail's encoding: canonical record bodies, the hash chain, the keys.

One module decides what bytes a record is, so the writer (`audit.store`) and the
checker (`audit.verify`) cannot disagree:

- a record body is JSON with sorted keys, no whitespace, ASCII only and no floats
  (times and latencies are integer microseconds), so one value has one encoding;
- `hash = SHA-256(previous hash || body)`, the first record chaining from 32 zero
  bytes (or, after a prune, from the signed checkpoint the remaining records follow);
- a checkpoint signs (chain id, seq, hash, time, previous checkpoint, reason) with
  Ed25519, behind a domain-separation prefix, so a signature over anything else is
  never mistaken for one;
- values that may be sensitive (session ids, caller-supplied request ids, and any
  caller-chosen name that is not plainly a name) are stored as HMAC-SHA256 under a
  per-store random key kept in a file of its own (0600), never in the database:
  with the database alone nobody can test guesses, with the key an admin can search
  for a known value (`hybridroute audit hash VALUE`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hybridroute.router.audit.events import AuditEvent, AuditNote
from hybridroute.router.policy.detectors import BUILTIN

__all__ = [
    "FORMAT",
    "GENESIS",
    "KeyedHasher",
    "canonical",
    "chain_hash",
    "checkpoint_message",
    "event_body",
    "key_id",
    "load_signing_key",
    "load_verify_key",
    "note_body",
    "signature_ok",
]

FORMAT = "hybridroute-audit/1"
GENESIS = "0" * 64
_CHECKPOINT_DOMAIN = b"hybridroute-audit-checkpoint/1\n"
HMAC_PREFIX = "hmac-sha256:"


def canonical(value: Mapping[str, object]) -> str:
    """The one encoding of a record body (see the module docstring)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def chain_hash(prev_hex: str, body: str) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hex) + body.encode("ascii")).hexdigest()


# --- the HMAC key ---------------------------------------------------------------------


class KeyedHasher:
    """HMAC-SHA256 under the store's key, for values that must be searchable, not kept."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("an audit HMAC key is 32 bytes")
        self._key = key
        self.key_id = hashlib.sha256(b"hybridroute-audit-hmac-key-id\n" + key).hexdigest()[:16]
        self._names: dict[str, str] = {}

    @classmethod
    def from_file(cls, path: Path, *, create: bool = False) -> KeyedHasher:
        """Read the key file (64 hex digits); with `create`, make it first if missing."""
        if create and not path.exists():
            _create_secret(path, secrets.token_hex(32) + "\n")
        try:
            text = path.read_text().strip()
            return cls(bytes.fromhex(text))
        except FileNotFoundError:
            raise ValueError(f"{path}: audit HMAC key file not found") from None
        except OSError as exc:  # a directory, no permission, an I/O error
            raise ValueError(f"{path}: cannot read the audit HMAC key ({_why(exc)})") from None
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"{path}: not an audit HMAC key (64 hex digits)") from None

    def digest(self, value: str) -> str:
        mac = hmac.new(self._key, value.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return HMAC_PREFIX + mac.hexdigest()

    def name(self, value: str) -> str:
        """`value` when it is plainly a name; its keyed hash when it might be data.

        Model names, versions and input names are chosen by the caller, so a caller can
        put anything there. A value with unusual characters, or in which a built-in
        detector fires, is hashed. Results are cached: names repeat.
        """
        known = self._names.get(value)
        if known is None:
            known = value if _plain(value) else self.digest(value)
            if len(self._names) > 4096:
                self._names.clear()
            self._names[value] = known
        return known


_PLAIN = re.compile(r"^[A-Za-z0-9_.:/\[\]-]{1,128}$")


def _plain(value: str) -> bool:
    if not _PLAIN.match(value):
        return False
    return not any(next(iter(d.find(value)), None) is not None for d in BUILTIN.values())


def _create_secret(path: Path, text: str) -> None:
    """Write a new secret file 0600; O_EXCL so two routers never overwrite each other."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the signing key ------------------------------------------------------------------


def load_signing_key(path: Path, *, create: bool = False) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 key checkpoints are signed with (PKCS8 PEM, as `certs init` makes).

    With `create` and no file, make a keypair (`.key` 0600, `.pub` beside it): the
    default for a router whose config names no key.
    """
    pub = path.with_suffix(".pub")
    if create and not path.exists() and pub.exists():
        raise ValueError(
            f"{path}: audit signing key not found, but its public half {pub} is there: "
            "restore the key (or move the .pub away to make a new pair)"
        )
    if create and not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _create_secret(path, pem.decode())
        pub.write_bytes(_public_pem(key.public_key()))
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ValueError(f"{path}: audit signing key not found") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the audit signing key ({_why(exc)})") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: the audit signing key must be Ed25519")
    return loaded


def load_verify_key(path: Path) -> ed25519.Ed25519PublicKey:
    """The public half, as `audit-signing.pub` holds it (SubjectPublicKeyInfo PEM)."""
    try:
        loaded = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{path}: verification key not found") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the verification key ({_why(exc)})") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise ValueError(f"{path}: the audit verification key must be Ed25519")
    return loaded


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _public_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(key: ed25519.Ed25519PublicKey) -> str:
    """A short, stable name for a verification key (SHA-256 of its raw bytes)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def checkpoint_message(
    chain: str, seq: int, hash_hex: str, time_us: int, prev_seq: int, reason: str
) -> bytes:
    fields = {
        "chain": chain,
        "hash": hash_hex,
        "prev_seq": prev_seq,
        "reason": reason,
        "seq": seq,
        "time_us": time_us,
    }
    return _CHECKPOINT_DOMAIN + canonical(fields).encode("ascii")


def signature_ok(key: ed25519.Ed25519PublicKey, message: bytes, signature_hex: str) -> bool:
    try:
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True


# --- record bodies --------------------------------------------------------------------


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def event_body(event: AuditEvent, hasher: KeyedHasher, full: bool) -> dict[str, object]:
    """A decision's record body, without `seq` (the writer numbers it). Empty values are
    left out; everything the caller chose freely is hashed or vetted by `name`. A request
    mirrored to a rollout's candidate has `shadow` ({pool, zone, version}), and one that
    was retried `earlier` (the endpoints tried before the last), and one served other
    than decided (a fallback) `decided` ({route, zone}); others have no such keys, so
    records written before they existed encode (and verify) as they did."""
    body: dict[str, object] = {
        "kind": "request",
        "time_us": _us(event.time),
        "request_id": event.request_id,
        "outcome": event.outcome,
        "code": event.code,
        "error": event.error,
        "caller": event.caller,
        "auth": event.auth,
        "method": event.method,
        "model": hasher.name(event.model) if event.model else "",
        "model_version": hasher.name(event.model_version) if event.model_version else "",
        "served_version": hasher.name(event.served_version) if event.served_version else "",
        "label": event.label,
        "policy": event.policy_hash,
        "rule": event.rule_id,
        "sensitive": event.sensitive,
        "reasons": list(event.reasons),
        "findings": dict(event.findings),
        "route": event.route,
        "zone": event.zone,
        "pool": event.pool,
        "endpoint": event.endpoint,
        "attempts": event.attempts,
        "latency_us": _us(event.latency_ms / 1000),
        "bytes_in": event.bytes_in,
        "bytes_out": event.bytes_out,
        "withheld": event.withheld,
        "session": hasher.digest(event.session_id) if event.session_id else "",
        "client_request_id": (
            hasher.digest(event.client_request_id) if event.client_request_id else ""
        ),
        "detail": "full" if full else "decisions",
    }
    decided = (event.decided_route, event.decided_zone)
    if event.decided_route and decided != (event.route, event.zone):  # a fallback served
        body["decided"] = {"route": event.decided_route, "zone": event.decided_zone}
    if event.earlier:  # only after a retry: older records are unchanged
        body["earlier"] = [
            {"zone": zone, "pool": pool, "endpoint": endpoint}
            for zone, pool, endpoint in event.earlier
        ]
    if event.shadow_pool:  # only when a copy was mirrored: older records are unchanged
        body["shadow"] = {
            "pool": event.shadow_pool,
            "zone": event.shadow_zone,
            "version": hasher.name(event.shadow_version),
        }
    if full:
        body["trace"] = [
            [t.rule_id, t.matched, t.why_not or ""] for t in event.trace if t.evaluated
        ]
        body["hits"] = [[h.detector, hasher.name(h.source), h.start, h.end] for h in event.hits]
    return {k: v for k, v in body.items() if v is not None and v != "" and v != [] and v != {}}


def note_body(note: AuditNote) -> dict[str, object]:
    return {**note.fields, "kind": note.kind, "time_us": _us(note.time)}
