"""The router's own configuration (`router.yaml`): where it listens, how callers
authenticate, which policy it enforces, and how it reaches upstream nodes.

Everything about *where requests may go* lives in the policy, owned by the security
team; this file is the operator's. Relative paths are resolved against the file's
folder, so a state directory can be moved as a whole.

    listen: 127.0.0.1:8100
    tls: {cert: pki/router.pem, key: pki/router.key, client_ca: pki/ca.pem}
    tokens:                      # bearer tokens, stored as SHA-256 of the token
      - {caller: analytics, sha256: 9f86d081...}
    policy: ../policies/default.yaml
    policy_public_key: keys/secteam.pub   # verify POLICY.sig ('hybridroute policy keygen')
    require_signed_policy: true           # refuse an unsigned policy at start and reload
    upstream: {ca: pki/ca.pem, cert: pki/router.pem, key: pki/router.key}
    metrics_listen: 127.0.0.1:9100
    admins: [demo-app]           # identities allowed to call the admin API (status)
    audit:                       # the durable trail (optional: these are the defaults)
      {db: audit.db, hmac_key: audit-hmac.key, signing_key: audit-signing.key,
       checkpoint_every: 1000, checkpoint_seconds: 10s, commit_timeout: 2s}
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from hybridroute.config import Strict, load_model
from hybridroute.router.policy.schema import Duration

__all__ = [
    "AuditConfig",
    "RouterConfig",
    "TLSFiles",
    "Token",
    "UpstreamFiles",
    "hash_token",
    "load_config",
    "new_token",
]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _sha256_hex(value: str) -> str:
    if not _HEX64.match(value):
        raise ValueError(
            "expected the token's SHA-256 as 64 lowercase hex digits "
            "(make one with 'hybridroute router token NAME')"
        )
    return value


def hash_token(token: str) -> str:
    """What the config stores for a bearer token. Tokens are random (>= 32 bytes), so a
    plain SHA-256 is enough: there is no low-entropy password to stretch."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "hrt_" + secrets.token_urlsafe(32)


class Token(Strict):
    caller: str = Field(min_length=1, max_length=128)
    sha256: Annotated[str, AfterValidator(_sha256_hex)]

    def matches(self, digest: str) -> bool:
        return hmac.compare_digest(self.sha256, digest)


class TLSFiles(Strict):
    cert: Path
    key: Path
    client_ca: Path | None = None  # verify app client certificates against this CA


class UpstreamFiles(Strict):
    ca: Path  # the private CA that signs on-prem node certificates
    cert: Path  # the router's client certificate for nodes
    key: Path
    cloud_ca: Path | None = None  # cloud endpoints' CA when a pool gives none (None = system)


class AuditConfig(Strict):
    """Where the audit trail is kept and how it is sealed (router/audit/store.py).

    There is no way to turn auditing off (invariant 5): without an `audit:` section the
    trail is `audit.db` next to this file. `hmac_key` (keyed hashes of session and
    request ids) and `signing_key` (Ed25519, checkpoints) default to files beside the
    database and are created on first use; point `signing_key` at the key `certs init`
    made to keep it apart from the data it seals.
    """

    db: Path = Path("audit.db")
    hmac_key: Path | None = None  # None: audit-hmac.key in the database's folder
    signing_key: Path | None = None  # None: audit-signing.key there (made if missing)
    checkpoint_every: int = Field(default=1000, ge=1)  # records between signed checkpoints
    checkpoint_seconds: Duration = 10.0  # and at most this long after an unsealed record
    commit_timeout: Duration = 2.0  # wait this long for a locked database, then fail
    # Records of requests refused while the trail cannot be written, held for writing on
    # recovery; past this many the newest (refused before any decision) are only counted.
    backlog: int = Field(default=20_000, ge=0)
    # Public halves (.pub) of signing keys this trail was signed with before a rotation.
    # A router that finds the trail's last checkpoint signed by one of these goes on
    # from it; by a key it cannot check, it does not start (it would seal over it).
    previous_keys: tuple[Path, ...] = ()

    def resolved(self, base: Path) -> AuditConfig:
        """Paths made absolute against `base`; a key not given defaults to a file in
        the database's folder."""
        db = self.db if self.db.is_absolute() else base / self.db

        def near(path: Path | None, default: str) -> Path:
            if path is None:
                return db.parent / default
            return path if path.is_absolute() else base / path

        return self.model_copy(
            update={
                "db": db,
                "hmac_key": near(self.hmac_key, "audit-hmac.key"),
                "signing_key": near(self.signing_key, "audit-signing.key"),
                "previous_keys": tuple(
                    p if p.is_absolute() else base / p for p in self.previous_keys
                ),
            }
        )


class RouterConfig(Strict):
    listen: str = "127.0.0.1:8100"
    token_listen: str | None = None  # TLS without client certificates, for token callers
    tls: TLSFiles | None = None
    insecure: bool = False  # plaintext front door: development only, logs a warning
    tokens: list[Token] = []
    policy: Path
    # The security team's Ed25519 public key (`hybridroute policy keygen`): a signed
    # policy must verify against it; with require_signed_policy an unsigned one is refused.
    policy_public_key: Path | None = None
    require_signed_policy: bool = False
    upstream: UpstreamFiles
    metrics_listen: str | None = None
    admins: list[str] = []
    grace_seconds: float = Field(default=5.0, ge=0)
    max_message_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    watch_policy: bool = True  # reload when the policy file changes (SIGHUP always does)
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="after")
    def _front_door(self) -> RouterConfig:
        if self.tls is None and not self.insecure:
            raise ValueError(
                "set tls (cert, key, client_ca) or, for development only, insecure: true"
            )
        if self.token_listen is not None and self.tls is None:
            raise ValueError("token_listen needs tls (cert, key): tokens never travel in plaintext")
        if self.require_signed_policy and self.policy_public_key is None:
            raise ValueError(
                "require_signed_policy needs policy_public_key: the public key the policy's "
                "signature must verify against (make one with 'hybridroute policy keygen')"
            )
        return self

    def resolved(self, base: Path) -> RouterConfig:
        """Relative paths made absolute against `base` (the config file's folder)."""

        def fix(path: Path) -> Path:
            return path if path.is_absolute() else base / path

        def fix_optional(path: Path | None) -> Path | None:
            return None if path is None else fix(path)

        tls = (
            None
            if self.tls is None
            else TLSFiles(
                cert=fix(self.tls.cert),
                key=fix(self.tls.key),
                client_ca=fix_optional(self.tls.client_ca),
            )
        )
        up = self.upstream
        upstream = UpstreamFiles(
            ca=fix(up.ca), cert=fix(up.cert), key=fix(up.key), cloud_ca=fix_optional(up.cloud_ca)
        )
        return self.model_copy(
            update={
                "tls": tls,
                "upstream": upstream,
                "policy": fix(self.policy),
                "policy_public_key": fix_optional(self.policy_public_key),
                "audit": self.audit.resolved(base),
            }
        )

    def caller_for_token(self, token: str) -> str | None:
        digest = hash_token(token)
        found = None
        for entry in self.tokens:  # compare all, constant time each: no early exit
            if entry.matches(digest):
                found = entry.caller
        return found


def load_config(path: str | Path) -> RouterConfig:
    """Load and validate router.yaml; errors name file, line and key."""
    path = Path(path)
    return load_model(path, RouterConfig).resolved(path.resolve().parent)
