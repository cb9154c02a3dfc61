"""TLS credentials for gRPC: the one place router and node turn PEM files into them.

Why one module: mutual TLS against the private CA is a security invariant (router to
node, app to router), so loading, validation, rotation and reading the caller's
identity are written once and tested once, not re-invented per server.

Rotation: `server_credentials` uses grpc's dynamic certificate configuration. grpc
calls our fetcher before every new TLS handshake; it re-reads the files only when their
inode, size, mtime or ctime changed (`hybridroute.filestamp`: a key made readable by
chmod or chown is read again), and keeps serving the last good certificate when the new
files are unreadable, half-written, do not match each other or have expired (one not
valid yet is served from its start). A server does not start on an expired certificate,
and serving one past its expiry is logged as an error. Connections that are
already open keep the certificate they were set up with; client-side credentials are
static, so clients pick up a rotated client certificate by building a new channel.
grpc never checks a client certificate's dates (the server refuses it in the
handshake), so `client_credentials` returns it for its presenter to check
(`validity_problem`) and `reissue_command` says how to replace it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shlex
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hybridroute.filestamp import Stamp, stamp

__all__ = [
    "CertInfo",
    "CredentialsError",
    "channel_credentials",
    "client_credentials",
    "describe_certificate",
    "has_expired",
    "load_certificates",
    "load_private_key",
    "peer_identities",
    "public_der",
    "reissue_command",
    "server_credentials",
    "validity_problem",
]

_LOG = logging.getLogger(__name__)

# Keys of grpc's auth context for an SSL peer (verified against grpcio 1.85).
_AUTH_TRANSPORT = "transport_security_type"
_AUTH_CN = "x509_common_name"
_AUTH_DNS = "peer_dns"


class CredentialsError(OSError):
    """A certificate or key file is missing, unreadable, not PEM, or inconsistent.

    The message always names the file, so an operator can fix it without a traceback.
    An OSError, like the missing file it usually is: `node serve` and `router serve`
    print those as an error line and exit, instead of a traceback.
    """


class _AuthContextSource(Protocol):
    """What `peer_identities` needs from a sync or aio `ServicerContext`."""

    # Really a mapping to lists of bytes; grpc-stubs types the sync one as `bytes`.
    def auth_context(self) -> Mapping[str, Iterable[bytes] | bytes]: ...


@dataclass(frozen=True)
class CertInfo:
    """What an operator wants to know about a certificate file at a glance."""

    path: Path
    common_name: str | None
    sans: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    usages: tuple[str, ...]
    serial: int
    issuer: str
    sha256: str

    @property
    def expired(self) -> bool:
        return self.not_after <= dt.datetime.now(dt.UTC)


def _read(path: Path, what: str) -> bytes:
    """Read a PEM file, or fail with an error that names the file and what it should be."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise CredentialsError(f"{path}: {what} file not found") from exc
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read {what} file: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise CredentialsError(f"{path}: not a PEM file (expected a {what})")
    return data


def _certificates_from(path: Path, data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CredentialsError(f"{path}: no valid PEM certificate ({what}): {exc}") from exc
    return certs


def _private_key_from(path: Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: the key is encrypted; hybridroute reads unencrypted keys only.
        raise CredentialsError(f"{path}: not a valid unencrypted PEM private key") from exc


def load_certificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """Load every certificate of a PEM file (a chain or a CA bundle); at least one."""
    return _certificates_from(path, _read(path, what), what)


def load_private_key(path: Path) -> PrivateKeyTypes:
    """Load an unencrypted PEM private key (PKCS#8 or traditional)."""
    return _private_key_from(path, _read(path, "private key"))


def public_der(key: PublicKeyTypes) -> bytes:
    """The public key as DER SubjectPublicKeyInfo: equal for a private key's public key
    and its certificate's exactly when they belong together."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class _Pem:
    """Validated PEM bytes of a certificate chain and its key, as grpc wants them."""

    chain: bytes
    key: bytes
    leaf: x509.Certificate


def _load_pair(cert: Path, key: Path) -> _Pem:
    """Read a chain and its key, and check they belong together before grpc sees them."""
    chain_pem = _read(cert, "certificate")
    key_pem = _read(key, "private key")
    leaf = _certificates_from(cert, chain_pem, "certificate")[0]
    private = _private_key_from(key, key_pem)
    if public_der(private.public_key()) != public_der(leaf.public_key()):
        raise CredentialsError(f"{key}: private key does not match certificate {cert}")
    return _Pem(chain_pem, key_pem, leaf)


def _load_ca(path: Path) -> bytes:
    data = _read(path, "CA certificate")
    _certificates_from(path, data, "CA certificate")
    return data


def _describe_leaf(cert: x509.Certificate) -> str:
    cn = _common_name(cert.subject) or "?"
    return f"CN={cn} serial={cert.serial_number:x} expires={cert.not_valid_after_utc:%Y-%m-%d}"


_Config = grpc.ServerCertificateConfiguration


def _not_yet_valid(leaf: x509.Certificate, now: dt.datetime) -> bool:
    return now < leaf.not_valid_before_utc


def has_expired(cert: x509.Certificate, now: dt.datetime | None = None) -> bool:
    """Whether `cert` is past its end of validity (at `now`, by default the current time)."""
    return cert.not_valid_after_utc <= (now or dt.datetime.now(dt.UTC))


class _ServerCertReloader:
    """The fetcher grpc calls before each new handshake: new files in, bad files ignored.

    A new certificate that has expired is ignored like a bad file; one that is not valid
    yet is held and served from its start time, the current one until then. Serving a
    certificate past its expiry (every client refuses it) is logged as an error, once.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._paths = (cert, key) if client_ca is None else (cert, key, client_ca)
        self._lock = threading.Lock()
        self._seen = self._stamps()
        self.initial, self.current = self._load()
        self._pending: tuple[_Config, x509.Certificate] | None = None
        self._expiry_logged = False
        now = dt.datetime.now(dt.UTC)
        if has_expired(self.current, now):
            raise CredentialsError(
                f"{cert}: certificate {_describe_leaf(self.current)} has expired, so every "
                "client would refuse it: issue a new one (hybridroute certs issue)"
            )
        if _not_yet_valid(self.current, now):
            _LOG.warning(
                "server certificate %s from %s is not valid before %s: clients refuse it "
                "until then (is this host's clock right?)",
                _describe_leaf(self.current),
                cert,
                f"{self.current.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
            )

    def _stamps(self) -> tuple[Stamp, ...]:
        return tuple(stamp(path) for path in self._paths)

    def _load(self) -> tuple[_Config, x509.Certificate]:
        pair = _load_pair(self._cert, self._key)
        roots = None if self._client_ca is None else _load_ca(self._client_ca)
        config = grpc.ssl_server_certificate_configuration([(pair.key, pair.chain)], roots)
        return config, pair.leaf

    def __call__(self) -> _Config | None:
        with self._lock:
            now = dt.datetime.now(dt.UTC)
            stamps = self._stamps()
            if stamps != self._seen:
                self._seen = stamps  # stat before reading: a write racing us changes it again
                self._pending = None
                return self._changed(now)
            if self._pending is not None and not _not_yet_valid(self._pending[1], now):
                config, leaf = self._pending
                self._pending = None
                return self._serve(config, leaf, "its validity has begun")
            if not self._expiry_logged and has_expired(self.current, now):
                self._expiry_logged = True
                _LOG.error(
                    "serving server certificate %s from %s past its expiry: clients refuse "
                    "it; replace the files with a new certificate and key "
                    "(hybridroute certs issue)",
                    _describe_leaf(self.current),
                    self._cert,
                )
            return None

    def _changed(self, now: dt.datetime) -> _Config | None:
        try:
            config, leaf = self._load()
        except CredentialsError as exc:
            problem = str(exc)
        else:
            if has_expired(leaf, now):
                problem = f"{self._cert}: the new certificate {_describe_leaf(leaf)} has expired"
            elif _not_yet_valid(leaf, now):
                self._pending = (config, leaf)
                problem = (
                    f"{self._cert}: the new certificate {_describe_leaf(leaf)} is not valid "
                    f"before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC; it will be "
                    "served from then"
                )
            else:
                return self._serve(config, leaf, "")
        _LOG.warning(
            "TLS files changed but cannot be used yet, still serving %s: %s",
            _describe_leaf(self.current),
            problem,
        )
        return None

    def _serve(self, config: _Config, leaf: x509.Certificate, why: str) -> _Config:
        self.current, self._expiry_logged = leaf, False
        _LOG.info(
            "reloaded server certificate %s from %s%s",
            _describe_leaf(leaf),
            self._cert,
            f" ({why})" if why else "",
        )
        return config


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """Credentials for a TLS server; with `client_ca`, clients must present a cert it signed.

    The files are re-read when they change, so rotating them takes effect for new
    connections without a restart. Raises `CredentialsError` if they are unusable now.
    Call it once per `add_secure_port`: grpc cannot share one dynamic credentials object
    between ports (the second port fails to bind).
    """
    reloader = _ServerCertReloader(
        Path(cert), Path(key), None if client_ca is None else Path(client_ca)
    )
    # grpc-stubs types the fetcher as never returning None, but None ("unchanged") is the
    # documented answer we give on almost every handshake.
    fetcher = cast("Callable[[], grpc.ServerCertificateConfiguration]", reloader)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, fetcher, require_client_authentication=client_ca is not None
    )


def channel_credentials(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Credentials for a TLS client trusting only `ca`; mutual TLS when cert and key are given.

    Read once: a channel keeps these for its lifetime, so build a new channel to pick up
    a rotated client certificate.
    """
    roots = _load_ca(Path(ca))
    if (cert is None) != (key is None):
        raise CredentialsError("a client certificate and its key must be given together")
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=roots)
    return _mutual(roots, Path(cert), Path(key))[0]


def client_credentials(
    ca: Path, cert: Path, key: Path
) -> tuple[grpc.ChannelCredentials, x509.Certificate]:
    """`channel_credentials` for mutual TLS, and the client certificate they present.

    grpc never looks at that certificate's dates, and a server that refuses it for them
    only fails the handshake, so whoever presents it checks them (`validity_problem`).
    """
    return _mutual(_load_ca(Path(ca)), Path(cert), Path(key))


def _mutual(
    roots: bytes, cert: Path, key: Path
) -> tuple[grpc.ChannelCredentials, x509.Certificate]:
    pair = _load_pair(cert, key)
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=pair.key, certificate_chain=pair.chain
    )
    return creds, pair.leaf


def validity_problem(cert: x509.Certificate, now: dt.datetime | None = None) -> str | None:
    """Why a peer refuses `cert` for its dates right now (naming it and the date that
    matters), or None while it is valid."""
    now = now or dt.datetime.now(dt.UTC)
    if has_expired(cert, now):
        return f"certificate {_describe_leaf(cert)} has expired"
    if _not_yet_valid(cert, now):
        return (
            f"certificate {_describe_leaf(cert)} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC (is this host's clock right?)"
        )
    return None


def reissue_command(cert: x509.Certificate, path: Path, ca_dir: Path) -> str:
    """The `hybridroute certs issue` line that replaces the certificate at `path` (and
    its key, STEM.key beside it) with a new one of the same name, SANs and usages."""
    words = ["hybridroute", "certs", "issue", _common_name(cert.subject) or "NAME"]
    usages = _usages(cert)
    words += [f"--{usage}" for usage in ("client", "server") if usage in usages]
    for san in _sans(cert):
        words += ["--san", san]
    words += ["--ca-dir", str(ca_dir), "--out", str(path.parent), "--stem", path.stem]
    return shlex.join([*words, "--force"])


def _auth_values(auth: Mapping[str, Iterable[bytes] | bytes], key: str) -> list[bytes]:
    value = auth.get(key, [])
    return [value] if isinstance(value, bytes) else list(value)


def peer_identities(context: _AuthContextSource) -> frozenset[str]:
    """The caller's verified identities: its certificate's CN and DNS SANs.

    Empty for plaintext or when the caller sent no certificate. IP SANs are left out
    on purpose: an address is not a name a policy should grant anything to. grpc
    reports a certificate without a CN as an empty CN; that is no name, so it is left
    out too (a certificate with neither CN nor DNS SAN has no identity).
    """
    auth = context.auth_context()
    if _auth_values(auth, _AUTH_TRANSPORT) != [b"ssl"]:
        return frozenset()
    names: set[str] = set()
    for raw in _auth_values(auth, _AUTH_CN) + _auth_values(auth, _AUTH_DNS):
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if name:
            names.add(name)
    return frozenset(names)


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = ext.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    return (*dns, *ips)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "server", ExtendedKeyUsageOID.CLIENT_AUTH: "client"}


def _usages(cert: x509.Certificate) -> tuple[str, ...]:
    if _is_ca(cert):
        return ("ca",)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku)


def describe_certificate(path: Path) -> CertInfo:
    """Summarise the first certificate of a PEM file (for `certs init` and `status`)."""
    cert = load_certificates(Path(path))[0]
    return CertInfo(
        path=Path(path),
        common_name=_common_name(cert.subject),
        sans=_sans(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=_is_ca(cert),
        usages=_usages(cert),
        serial=cert.serial_number,
        issuer=_common_name(cert.issuer) or cert.issuer.rfc4514_string(),
        sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )
