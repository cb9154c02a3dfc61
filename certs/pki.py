"""The dev PKI: a private CA and the certificates a local hybridroute stack needs.

Why code and not an openssl recipe: tests and `hybridroute up` mint a fresh PKI at run
time (no key is ever committed), and the rules that matter live in one place: keys are
0600 from their first byte, nothing is overwritten unless asked, every file is written
atomically, and each role gets exactly the key usages it needs (the router is a TLS
server to apps and a TLS client to nodes; nodes and cloud endpoints are servers; apps
are clients). EC P-256 keys keep minting fast enough for every test session.

The audit signing keypair is the exception to "overwritten when asked": every
checkpoint of every audit trail is signed with it, so a new one would leave those
trails unverifiable. `init_pki(force=True)` replaces the CA and certificates and keeps
it; rotating it is moving both files away (keeping the old .pub, which `audit verify
--key old.pub --key new.pub` needs) and running `init` again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hybridroute.certs.credentials import (
    CredentialsError,
    has_expired,
    load_certificates,
    load_private_key,
    public_der,
)

__all__ = [
    "CA_DAYS",
    "DEFAULT_APP",
    "DEFAULT_LEAF_DAYS",
    "RESERVED_IDENTITIES",
    "CertPair",
    "IssuedCert",
    "PkiExistsError",
    "PkiLayout",
    "init_pki",
    "issue_leaf",
]

CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825
DEFAULT_APP = "demo-app"
# Service identities: an app named like one could pose as it (nodes trust "router").
RESERVED_IDENTITIES = frozenset({"router", "node", "cloud", "ca", "localhost", "audit-signing"})
_LOCAL_SANS = ("localhost", "127.0.0.1", "::1")
_CLOCK_SKEW = dt.timedelta(minutes=5)
_CN_MAX = 64  # RFC 5280 upper bound for a CommonName
_ORG = "hybridroute"
_CA_NAME = f"{_ORG} dev CA"
_DNS_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_FILE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
_Issuer = tuple[x509.Certificate, _IssuerKey]
_ISSUER_KEY_TYPES = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)


class PkiExistsError(FileExistsError):
    """Some output files already exist and overwriting was not requested."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)
        names = ", ".join(str(p) for p in self.paths)
        super().__init__(f"refusing to overwrite existing files: {names}")


@dataclass(frozen=True)
class CertPair:
    """A certificate file and its private key file."""

    cert: Path
    key: Path

    def files(self) -> tuple[Path, Path]:
        return (self.cert, self.key)


@dataclass(frozen=True)
class PkiLayout:
    """Where `init_pki` puts each file, so callers never spell file names themselves."""

    root: Path

    def pair(self, stem: str) -> CertPair:
        return CertPair(self.root / f"{stem}.pem", self.root / f"{stem}.key")

    @property
    def ca(self) -> CertPair:
        return self.pair("ca")

    @property
    def router(self) -> CertPair:
        return self.pair("router")

    @property
    def node(self) -> CertPair:
        return self.pair("node")

    @property
    def cloud(self) -> CertPair:
        return self.pair("cloud")

    def app(self, name: str) -> CertPair:
        return self.pair(f"app-{name}")

    @property
    def audit_key(self) -> Path:
        return self.root / "audit-signing.key"

    @property
    def audit_pub(self) -> Path:
        return self.root / "audit-signing.pub"


@dataclass(frozen=True)
class IssuedCert:
    """One thing `init_pki`/`issue_leaf` made: the public file, its key, and what it is for.

    For the audit signing keypair `cert` is the public key file and `not_after` is None;
    `kept` says it already existed and was left as it was.
    """

    cert: Path
    key: Path
    identity: str
    sans: tuple[str, ...]
    usage: str
    not_after: dt.datetime | None
    kept: bool = False


@dataclass(frozen=True)
class _LeafSpec:
    stem: str
    identity: str
    sans: tuple[str, ...]
    server: bool
    client: bool

    @property
    def usage(self) -> str:
        return "+".join(u for u, on in (("server", self.server), ("client", self.client)) if on)


@dataclass(frozen=True)
class _Output:
    path: Path
    data: bytes
    private: bool


def _check_dns_name(name: str, what: str) -> str:
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not a valid DNS name")
    return name


def _check_common_name(name: str, what: str) -> str:
    """A certificate's CN holds 1 to 64 characters; say so before minting anything."""
    if not 1 <= len(name) <= _CN_MAX:
        raise ValueError(
            f"{what} {name!r} has {len(name)} characters; it becomes the CN of its "
            f"certificate, which holds 1 to {_CN_MAX}: choose a name that fits"
        )
    return name


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(_check_dns_name(value, "SAN"))


def _dedupe(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _standard_specs(apps: Sequence[str], sans: Sequence[str]) -> list[_LeafSpec]:
    """The leaves of a dev stack: router, node, cloud and one client cert per app."""
    for app in apps:
        _check_dns_name(app, "app name")
        _check_common_name(app, "app name")
        if app.lower() in RESERVED_IDENTITIES:
            raise ValueError(f"app name {app!r} is reserved for a service identity")
    for san in sans:
        _general_name(san)
    extra = _dedupe(sans)
    specs = [
        _LeafSpec("router", "router", _dedupe(("router", *_LOCAL_SANS, *extra)), True, True),
        _LeafSpec("node", "node", _dedupe(("node", *_LOCAL_SANS, *extra)), True, False),
        _LeafSpec("cloud", "cloud", _dedupe(("cloud", *_LOCAL_SANS, *extra)), True, False),
    ]
    specs += [_LeafSpec(f"app-{a}", a, (a,), False, True) for a in _dedupe(apps)]
    return specs


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG)
    return x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sign_hash(key: _IssuerKey) -> hashes.SHA256 | None:
    """Ed25519/Ed448 issuers sign without a separate digest; everything else uses SHA-256."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only (EC keys do no key encipherment); a CA also signs certs and CRLs."""
    no = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False
    )
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
        **no,
    )


def _make_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = _name(_CA_NAME)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _authority_key_id(ca: _Issuer) -> x509.AuthorityKeyIdentifier:
    cert, key = ca
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # a CA made elsewhere: derive the id from its key
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _make_leaf(
    spec: _LeafSpec, key: ec.EllipticCurvePrivateKey, ca: _Issuer, now: dt.datetime, days: int
) -> x509.Certificate:
    """Sign a leaf; it never outlives its CA, since it would be useless past that."""
    ca_cert, ca_key = ca
    ekus = [ExtendedKeyUsageOID.SERVER_AUTH] if spec.server else []
    ekus += [ExtendedKeyUsageOID.CLIENT_AUTH] if spec.client else []
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(spec.identity))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(s) for s in spec.sans]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
        .sign(ca_key, _sign_hash(ca_key))
    )


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    pkcs8, pem = serialization.PrivateFormat.PKCS8, serialization.Encoding.PEM
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _refuse_existing(paths: Iterable[Path]) -> None:
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise PkiExistsError(existing)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Give the finished temp file its real name, atomically, never clobbering by accident."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` appeared since we checked
    except FileExistsError:
        raise PkiExistsError([path]) from None
    except OSError:  # a filesystem without hard links: check, then rename
        _refuse_existing([path])
        os.replace(tmp, path)


def _write_atomic(out: _Output, overwrite: bool) -> None:
    """Write to a private temp file in the same directory, fsync, then rename into place.

    The temp file is created 0600 (keys) with O_EXCL, so a key is never readable by
    others, not even for a moment, and a crash leaves no half-written key behind.
    """
    tmp = out.path.with_name(f".{out.path.name}.{secrets.token_hex(6)}.tmp")
    mode = 0o600 if out.private else 0o644
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        if out.private:
            os.fchmod(fd, 0o600)  # exact, whatever the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(out.data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, out.path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def _write_all(outputs: Sequence[_Output], overwrite: bool) -> None:
    if not overwrite:
        _refuse_existing(o.path for o in outputs)
    for out in outputs:
        _write_atomic(out, overwrite)
    for directory in {o.path.parent for o in outputs}:
        with contextlib.suppress(OSError):  # not every platform can fsync a directory
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"validity must be at least 1 day, not {days}")


def _leaf_outputs(
    spec: _LeafSpec, out: Path, ca: _Issuer, days: int
) -> tuple[list[_Output], IssuedCert]:
    key = _new_key()
    cert = _make_leaf(spec, key, ca, dt.datetime.now(dt.UTC), days)
    pair = PkiLayout(out).pair(spec.stem)
    outputs = [_Output(pair.key, _key_pem(key), True), _Output(pair.cert, _cert_pem(cert), False)]
    issued = IssuedCert(
        pair.cert, pair.key, spec.identity, spec.sans, spec.usage, cert.not_valid_after_utc
    )
    return outputs, issued


def _audit_outputs(layout: PkiLayout) -> tuple[list[_Output], IssuedCert]:
    """The Ed25519 keypair the audit trail is signed with: a new one, or the one that is
    there, kept (its .pub is written only if missing). Never replaced: see the module
    docstring."""
    key_path, pub_path = layout.audit_key, layout.audit_pub
    usage = "audit signing (Ed25519)"
    if _present(key_path):
        outputs = []
        if not _present(pub_path):
            outputs.append(_Output(pub_path, _public_pem(_load_audit_key(layout)), False))
        kept = IssuedCert(pub_path, key_path, "audit-signing", (), f"{usage}, kept", None, True)
        return outputs, kept
    if _present(pub_path):
        raise ValueError(
            f"{pub_path} exists without its private key {key_path.name}: move it away and "
            "run again (keep it: it verifies the audit trails signed so far)"
        )
    key = ed25519.Ed25519PrivateKey.generate()
    outputs = [_Output(key_path, _key_pem(key), True), _Output(pub_path, _public_pem(key), False)]
    return outputs, IssuedCert(pub_path, key_path, "audit-signing", (), usage, None)


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _load_audit_key(layout: PkiLayout) -> ed25519.Ed25519PrivateKey:
    """The existing audit key, to write its missing .pub again."""
    path, pub = layout.audit_key, layout.audit_pub.name
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path}: cannot read the audit signing key to write its missing {pub} ({exc}); "
            f"it is never replaced: restore {pub}, or move the key away (keep it if trails "
            "were signed with it) and run again"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key, so not an audit signing key")
    return key


def _public_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def init_pki(
    out: Path,
    *,
    apps: Sequence[str] = (DEFAULT_APP,),
    sans: Sequence[str] = (),
    days: int = DEFAULT_LEAF_DAYS,
    force: bool = False,
) -> list[IssuedCert]:
    """Create a new CA, the router/node/cloud/app certificates and the audit keypair.

    Every target is checked before anything is written: without `force`, one existing
    file means `PkiExistsError` and no file is touched. With `force` everything is
    replaced except an existing audit signing keypair, which is kept (its `IssuedCert`
    says `kept`). Raises `ValueError` for a bad app name, SAN or validity, or an audit
    .pub without its key.
    """
    out = Path(out)
    _check_days(days)
    specs = _standard_specs(apps, sans)
    layout = PkiLayout(out)
    now = dt.datetime.now(dt.UTC)
    ca_key = _new_key()
    ca_cert = _make_ca(ca_key, now)
    outputs = [_Output(layout.ca.key, _key_pem(ca_key), True)]
    outputs.append(_Output(layout.ca.cert, _cert_pem(ca_cert), False))
    issued = [
        IssuedCert(layout.ca.cert, layout.ca.key, _CA_NAME, (), "ca", ca_cert.not_valid_after_utc)
    ]
    for spec in specs:
        files, cert = _leaf_outputs(spec, out, (ca_cert, ca_key), days)
        outputs += files
        issued.append(cert)
    if not force:  # the audit keypair is in the way like any other file
        _refuse_existing([*(o.path for o in outputs), layout.audit_key, layout.audit_pub])
    audit_files, audit = _audit_outputs(layout)
    issued.append(audit)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_all(outputs, force)
    _write_all(audit_files, overwrite=False)  # only what is missing, even with force
    return issued


def _load_ca(ca_dir: Path) -> _Issuer:
    """The CA's certificate and key, refused unless a leaf they sign would be trusted:
    the key must be the certificate's, and the certificate must not have expired."""
    layout = PkiLayout(ca_dir)
    cert = load_certificates(layout.ca.cert, "CA certificate")[0]
    key = load_private_key(layout.ca.key)
    if not isinstance(key, _ISSUER_KEY_TYPES):
        raise CredentialsError(f"{layout.ca.key}: unsupported CA key type {type(key).__name__}")
    if public_der(key.public_key()) != public_der(cert.public_key()):
        raise CredentialsError(
            f"{layout.ca.key}: private key does not match the CA certificate "
            f"{layout.ca.cert}, so nothing signed with it would be trusted: restore the "
            "matching ca.key"
        )
    if has_expired(cert):
        raise CredentialsError(
            f"{layout.ca.cert}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}, so "
            f"nothing it signs would be trusted: make a new CA with 'hybridroute certs init "
            f"--out {ca_dir} --force' (it replaces every certificate)"
        )
    return cert, key


def issue_leaf(
    ca_dir: Path,
    name: str,
    *,
    client: bool = False,
    server: bool = False,
    sans: Sequence[str] | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    out: Path | None = None,
    stem: str | None = None,
    force: bool = False,
) -> IssuedCert:
    """Issue one more leaf (CN `name`) from the CA in `ca_dir`, e.g. to rotate or add a peer.

    Writes `out/stem.pem` and `out/stem.key` (defaults: `ca_dir`, `name`), making `out`
    if it is missing. `sans` defaults to just `name`. Raises `CredentialsError` if the
    CA cannot be loaded.
    """
    if not (client or server):
        raise ValueError("a leaf must be for client or server use (or both)")
    _check_days(days)
    _check_common_name(name, "name")
    stem = name if stem is None else stem
    if not _FILE_STEM.fullmatch(stem):
        raise ValueError(f"{stem!r} is not a plain file name")
    san_list = _dedupe((_check_dns_name(name, "name"),) if sans is None else sans)
    for san in san_list:
        _general_name(san)
    spec = _LeafSpec(stem, name, san_list, server, client)
    target = Path(ca_dir) if out is None else Path(out)
    if PkiLayout(target).pair(stem).key == PkiLayout(target).audit_key:
        raise ValueError(
            f"{stem}.key is the audit signing key, never replaced by a certificate's; "
            "choose another --stem"
        )
    if PkiLayout(target).pair(stem) == PkiLayout(target).ca:
        raise ValueError(
            f"{stem}.pem/{stem}.key are the CA's, never replaced by a leaf (without ca.key "
            "no certificate can be issued again); choose another --stem"
        )
    outputs, issued = _leaf_outputs(spec, target, _load_ca(Path(ca_dir)), days)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_all(outputs, force)
    return issued
