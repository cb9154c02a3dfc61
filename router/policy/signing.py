"""Detached Ed25519 signatures for routing policies: keys, the envelope, sign, verify.

A security team signs the exact bytes of a reviewed policy; a router configured with
`require_signed_policy` loads only a policy whose signature verifies against the team's
public key (as OPA does with signed bundles). The signature is a separate file next
to the policy, `POLICY.sig`, so the policy stays a plain, diffable YAML file.

The envelope (`POLICY.sig`) is one JSON object::

    {
      "format": "hybridroute-policy-signature/v1",
      "policy_sha256": "<hex SHA-256 of the policy file's bytes>",
      "signer": "secteam",
      "key_id": "<hex SHA-256 of the raw 32-byte Ed25519 public key>",
      "signed_at": "2025-01-31T12:00:00.250000Z",
      "signature": "<base64 Ed25519 signature>"
    }

The signature covers the *statement*: the bytes ``hybridroute-policy-signature/v1\\n``
followed by the other five fields as canonical JSON (sorted keys, no spaces). So the
signer, the key and the time are signed as well as the policy hash: none of them can
be swapped without the signature failing. `policy_sha256` is the same hash the router
reports as the policy's version, so status, audit and signature name one thing.

Key files are PEM (PKCS#8 private, SubjectPublicKeyInfo public), readable by openssl,
with a comment preamble naming the signer (`# signer: secteam`). When the *trusted*
public key names a signer, a signature must claim that same signer: the name shown
in `hybridroute status` then comes from the operator's key file, not only from the
signature. Private keys are written 0600, atomically, and never overwritten unless
asked.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = [
    "CLOCK_SKEW",
    "SIGNATURE_FORMAT",
    "KeyFileError",
    "PolicySignature",
    "SignatureError",
    "SigningKey",
    "TrustedKey",
    "check_not_future",
    "generate_keypair",
    "key_id",
    "load_signing_key",
    "load_trusted_key",
    "rfc3339",
    "sign_policy",
    "signature_path",
    "verify_envelope",
    "verify_policy_bytes",
    "verify_policy_file",
    "write_signature",
]

SIGNATURE_FORMAT = "hybridroute-policy-signature/v1"
_SIGNED_FIELDS = ("format", "policy_sha256", "signer", "key_id", "signed_at")
_SIGNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_SIGNER_LINE = re.compile(r"^#\s*signer:\s*(\S+)\s*$", re.M)
_MAX_ENVELOPE = 16 * 1024
# How far in the future a signing time may be before it is refused: clocks of the
# signing machine and the router disagree a little, never by hours.
CLOCK_SKEW = 300.0


class SignatureError(Exception):
    """A policy's signature is missing, malformed, from another key, or does not match."""


class KeyFileError(Exception):
    """A key file cannot be read or is not an Ed25519 key."""


@dataclass(frozen=True)
class SigningKey:
    """A private key and the signer name its file declares (None: not declared)."""

    private: ed25519.Ed25519PrivateKey
    signer: str | None
    key_id: str


@dataclass(frozen=True)
class TrustedKey:
    """The public key a router or `policy verify` trusts, and its declared signer."""

    public: ed25519.Ed25519PublicKey
    signer: str | None
    key_id: str
    path: Path


@dataclass(frozen=True)
class PolicySignature:
    """A verified signature: who signed which policy hash, when, with which key."""

    signer: str
    key_id: str
    signed_at: float  # unix seconds
    policy_sha256: str

    def describe(self) -> str:
        """`secteam (key 1a2b3c4d5e6f7a8b) at 2025-01-31T12:00:00Z`, for humans."""
        return f"{self.signer} (key {self.key_id[:16]}) at {rfc3339(self.signed_at)}"


def signature_path(policy: Path) -> Path:
    """Where the detached signature of `policy` lives: `POLICY.sig` beside it."""
    return policy.with_name(policy.name + ".sig")


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    """The key's fingerprint: hex SHA-256 of its raw 32 bytes (stable across PEM/DER)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def rfc3339(ts: float) -> str:
    """`2025-01-31T12:00:00Z`, or `2025-01-31T12:00:00.250000Z` for a time within a
    second: two policies signed in the same second are told apart by it."""
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if when.microsecond else "%Y-%m-%dT%H:%M:%SZ")


def _check_signer(signer: str) -> str:
    if not _SIGNER.match(signer):
        raise ValueError(
            f"signer {signer!r}: use 1-64 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit"
        )
    return signer


# --- keys ---------------------------------------------------------------------------


def _preamble(signer: str, kind: str, ident: str) -> bytes:
    return (
        f"# hybridroute policy signing {kind} (Ed25519)\n# signer: {signer}\n# key-id: {ident}\n"
    ).encode()


def _declared_signer(data: bytes) -> str | None:
    head = data.split(b"-----BEGIN", 1)[0].decode("utf-8", "replace")
    found = _SIGNER_LINE.search(head)
    return found[1] if found else None


def _write_new(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    """Write via a 0600 temp file and a rename: a key is never briefly world-readable
    and a crash leaves no half-written key. Refuses to replace a file unless forced."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use --force to replace it)")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate_keypair(out_dir: Path, signer: str, *, force: bool = False) -> tuple[Path, Path]:
    """Make `OUT/SIGNER.key` (private, 0600) and `OUT/SIGNER.pub`; returns both paths."""
    _check_signer(signer)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / f"{signer}.key", out_dir / f"{signer}.pub"
    for path in (key_path, pub_path):
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists (use --force to replace it)")
    private = ed25519.Ed25519PrivateKey.generate()
    ident = key_id(private.public_key())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(key_path, _preamble(signer, "key", ident) + pem, private=True, force=force)
    _write_new(pub_path, _preamble(signer, "public key", ident) + pub, private=False, force=force)
    return key_path, pub_path


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None


def load_signing_key(path: Path) -> SigningKey:
    """A private Ed25519 key in PEM (what `policy keygen` or openssl writes)."""
    data = _read_key_file(path)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key (policies are signed with Ed25519)")
    return SigningKey(private, _declared_signer(data), key_id(private.public_key()))


def load_trusted_key(path: Path) -> TrustedKey:
    """A public Ed25519 key in PEM; a private key file is refused (it must not be
    handed to routers, which only need to verify)."""
    data = _read_key_file(path)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path} holds a private key; give the public key (.pub) instead")
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key ({exc})") from None
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return TrustedKey(public, _declared_signer(data), key_id(public), path)


# --- the envelope ---------------------------------------------------------------------


def _statement(fields: dict[str, str]) -> bytes:
    """The signed bytes: a domain-separation line, then the fields as canonical JSON."""
    body = json.dumps({k: fields[k] for k in _SIGNED_FIELDS}, sort_keys=True, separators=(",", ":"))
    return f"{SIGNATURE_FORMAT}\n".encode() + body.encode()


def sign_policy(
    policy_bytes: bytes, key: SigningKey, *, signer: str | None = None, now: float | None = None
) -> bytes:
    """The signature envelope (JSON bytes) for a policy file's exact bytes."""
    name = signer or key.signer
    if name is None:
        raise ValueError("the key file names no signer; give one (--signer NAME)")
    if key.signer is not None and signer is not None and signer != key.signer:
        raise ValueError(f"the key file belongs to signer {key.signer!r}, not {signer!r}")
    fields = {
        "format": SIGNATURE_FORMAT,
        "policy_sha256": hashlib.sha256(policy_bytes).hexdigest(),
        "signer": _check_signer(name),
        "key_id": key.key_id,
        "signed_at": rfc3339(dt.datetime.now(dt.UTC).timestamp() if now is None else now),
    }
    signature = key.private.sign(_statement(fields))
    envelope = {**fields, "signature": base64.b64encode(signature).decode()}
    return (json.dumps(envelope, indent=2) + "\n").encode()


def write_signature(policy: Path, envelope: bytes, out: Path | None = None) -> Path:
    """Write the envelope beside the policy (or to `out`), replacing an older one."""
    target = out or signature_path(policy)
    _write_new(target, envelope, private=False, force=True)
    return target


def _parse_envelope(envelope: bytes) -> dict[str, str]:
    if len(envelope) > _MAX_ENVELOPE:
        raise SignatureError("the signature file is too large to be a signature")
    try:
        data = json.loads(envelope)
    except (ValueError, UnicodeDecodeError):
        raise SignatureError("the signature file is not JSON") from None
    if not isinstance(data, dict):
        raise SignatureError("the signature file is not a JSON object")
    if data.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(f"unknown signature format {data.get('format')!r}")
    missing = [k for k in (*_SIGNED_FIELDS, "signature") if not isinstance(data.get(k), str)]
    if missing:
        raise SignatureError(f"the signature file lacks {', '.join(missing)}")
    return {k: data[k] for k in (*_SIGNED_FIELDS, "signature")}


def _signed_at(text: str) -> float:
    """Whole seconds (as signatures were written before) or microseconds."""
    for layout in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return dt.datetime.strptime(text, layout).replace(tzinfo=dt.UTC).timestamp()
        except ValueError:
            continue
    raise SignatureError(f"bad signing time {text!r}")


def verify_policy_bytes(policy_bytes: bytes, envelope: bytes, key: TrustedKey) -> PolicySignature:
    """Check that `envelope` is a valid signature by `key` over exactly `policy_bytes`."""
    return verify_envelope(envelope, key, hashlib.sha256(policy_bytes).hexdigest())


def verify_envelope(envelope: bytes, key: TrustedKey, policy_sha256: str) -> PolicySignature:
    """Check that `envelope` is a valid signature by `key` for the policy whose bytes
    hash to `policy_sha256` (the router passes the hash of the bytes it compiled, so
    what was verified is exactly what will be enforced).

    The checks run in the order that gives the most useful message: which key signed
    (a different team's key is not "tampering"), then the signature itself, and only
    then whether the policy is the one that was signed.
    """
    fields = _parse_envelope(envelope)
    if fields["key_id"] != key.key_id:
        raise SignatureError(
            f"signed with key {fields['key_id'][:16]}, not the trusted key "
            f"{key.key_id[:16]} ({key.path})"
        )
    try:
        signature = base64.b64decode(fields["signature"], validate=True)
        key.public.verify(signature, _statement(fields))
    except (InvalidSignature, binascii.Error, ValueError):
        message = "the signature does not verify: the signature file was altered"
        raise SignatureError(message) from None
    if key.signer is not None and fields["signer"] != key.signer:
        raise SignatureError(
            f"signature claims signer {fields['signer']!r}, the trusted key is {key.signer!r}'s"
        )
    if policy_sha256 != fields["policy_sha256"]:
        raise SignatureError(
            f"the policy changed after it was signed, or this signature belongs to another "
            f"file (signed sha256 {fields['policy_sha256'][:12]}, file sha256 "
            f"{policy_sha256[:12]})"
        )
    return PolicySignature(
        fields["signer"], fields["key_id"], _signed_at(fields["signed_at"]), policy_sha256
    )


def check_not_future(signature: PolicySignature, now: float, skew: float = CLOCK_SKEW) -> None:
    """Refuse a signature dated more than `skew` seconds after `now`.

    The signing time is the rollback floor (a router refuses policies signed before the
    newest it accepted), so a signature from the future, made on a machine whose clock
    is wrong, would make a router refuse every policy signed until that time comes.
    """
    ahead = signature.signed_at - now
    if ahead > skew:
        raise SignatureError(
            f"signed at {rfc3339(signature.signed_at)}, {_span(ahead)} ahead of this "
            f"machine's clock ({rfc3339(now)}; {_span(skew)} of clock skew allowed): "
            "refused, since as a router's rollback floor it would refuse every policy "
            "signed before then; check the signing machine's clock and sign the policy again"
        )


def _span(seconds: float) -> str:
    """A duration for humans: `5 minutes`, `3.0 hours`, `12.5 days`."""
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def verify_policy_file(
    policy: Path, key: TrustedKey, signature: Path | None = None
) -> PolicySignature:
    """Read the policy and its signature file (default `POLICY.sig`) and verify them."""
    sig_path = signature or signature_path(policy)
    try:
        envelope = sig_path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"not signed: no signature file {sig_path}") from None
    except OSError as exc:
        raise SignatureError(f"cannot read {sig_path}: {exc.strerror or exc}") from None
    try:
        policy_bytes = policy.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read {policy}: {exc.strerror or exc}") from None
    return verify_policy_bytes(policy_bytes, envelope, key)
