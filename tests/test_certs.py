"""The dev PKI and TLS credentials, against real files and real gRPC servers over TLS.

The servers run the standard gRPC health service, so these tests need nothing from the
inference protocol: they prove who may connect, who the server thinks is calling, and
that rotated certificate files are served to new connections without a restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import shutil
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support import mint_leaf

from hybridroute.certs.credentials import (
    CredentialsError,
    channel_credentials,
    describe_certificate,
    peer_identities,
    server_credentials,
)
from hybridroute.certs.pki import PkiExistsError, PkiLayout, init_pki, issue_leaf
from hybridroute.cli import main

SERVING = health_pb2.HealthCheckResponse.SERVING
EXPECTED_FILES = {
    *(f"{stem}.{ext}" for stem in ("ca", "router", "node", "cloud") for ext in ("pem", "key")),
    *(f"app-{a}.{ext}" for a in ("demo-app", "other-app", "admin") for ext in ("pem", "key")),
    "audit-signing.key",
    "audit-signing.pub",
}


# --- helpers -----------------------------------------------------------------------------


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def san_strings(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        *ext.get_values_for_type(x509.DNSName),
        *map(str, ext.get_values_for_type(x509.IPAddress)),
    }


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


class RecordingHealth(health.HealthServicer):
    """The stock health service, noting who each caller is according to `peer_identities`."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[frozenset[str]] = []

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.callers.append(peer_identities(context))
        return super().Check(request, context)


class HealthServer:
    """A sync gRPC server on a free 127.0.0.1 port serving `RecordingHealth`."""

    def __init__(self, creds: grpc.ServerCredentials | None) -> None:
        self.servicer = RecordingHealth()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        if creds is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture
def serve() -> Iterator[type[HealthServer]]:
    started: list[HealthServer] = []

    class Tracked(HealthServer):
        def __init__(self, creds: grpc.ServerCredentials | None) -> None:
            super().__init__(creds)
            started.append(self)

    yield Tracked
    for server in started:
        server.stop()


def check(
    port: int, creds: grpc.ChannelCredentials | None, server_name: str = "localhost"
) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    """One health check on a brand-new connection (no subchannel shared with other tests)."""
    options = [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    target = f"127.0.0.1:{port}"
    with (
        grpc.insecure_channel(target)
        if creds is None
        else grpc.secure_channel(target, creds, options=options)
    ) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return reply.status


def served_certificate(port: int, pki: Path | None = None) -> x509.Certificate:
    """The certificate the server presents to a new TLS connection, read with stdlib
    `ssl`: verified against `pki`'s CA (as `demo-app`), or, without `pki`, whatever its
    dates (an expired or not yet valid one too)."""
    ctx = ssl.create_default_context()
    if pki is None:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    else:
        layout = PkiLayout(pki)
        ctx.load_verify_locations(cafile=str(layout.ca.cert))
        ctx.check_hostname = False
        ctx.load_cert_chain(layout.app("demo-app").cert, layout.app("demo-app").key)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA with the same identities: trusted by nobody here."""
    root = tmp_path_factory.mktemp("other-pki")
    init_pki(root)
    return root


@pytest.fixture
def mtls_node(pki: Path, serve: type[HealthServer]) -> HealthServer:
    layout = PkiLayout(pki)
    return serve(server_credentials(layout.node.cert, layout.node.key, layout.ca.cert))


# --- the PKI -----------------------------------------------------------------------------


def test_init_writes_every_file_with_private_keys_0600(pki: Path) -> None:
    assert set(os.listdir(pki)) == EXPECTED_FILES
    for name in EXPECTED_FILES:
        mode = stat.S_IMODE((pki / name).stat().st_mode)
        assert mode == 0o600 if name.endswith(".key") else not mode & 0o022, name


def test_leaves_have_the_identities_sans_and_usages_of_their_role(pki: Path) -> None:
    layout = PkiLayout(pki)
    ca = load_cert(layout.ca.cert)
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    router, node = load_cert(layout.router.cert), load_cert(layout.node.cert)
    app = load_cert(layout.app("other-app").cert)
    assert eku(router) == {server, client}
    assert eku(node) == eku(load_cert(layout.cloud.cert)) == {server}
    assert eku(app) == {client}
    assert san_strings(router) == {"router", "localhost", "127.0.0.1", "::1"}
    assert san_strings(node) == {"node", "localhost", "127.0.0.1", "::1"}
    assert san_strings(load_cert(layout.cloud.cert)) == {"cloud", "localhost", "127.0.0.1", "::1"}
    assert san_strings(app) == {"other-app"}
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    for leaf in (router, node, app):
        leaf.verify_directly_issued_by(ca)
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert len({c.serial_number for c in (ca, router, node, app)}) == 4


def test_ca_is_a_ca_for_ten_years_and_leaves_last_825_days(pki: Path) -> None:
    layout = PkiLayout(pki)
    ca = load_cert(layout.ca.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days in range(3650, 3652)
    node = load_cert(layout.node.cert)
    assert (node.not_valid_after_utc - node.not_valid_before_utc).days in range(825, 827)


def test_audit_signing_keypair_is_ed25519_and_matches(pki: Path) -> None:
    layout = PkiLayout(pki)
    key = serialization.load_pem_private_key(layout.audit_key.read_bytes(), password=None)
    pub = serialization.load_pem_public_key(layout.audit_pub.read_bytes())
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    pub.verify(key.sign(b"record"), b"record")


def test_extra_sans_and_days(tmp_path: Path) -> None:
    init_pki(tmp_path, sans=["models.example.test", "10.1.2.3"], days=30)
    node = load_cert(PkiLayout(tmp_path).node.cert)
    assert {"models.example.test", "10.1.2.3"} <= san_strings(node)
    assert (node.not_valid_after_utc - dt.datetime.now(dt.UTC)).days in (29, 30)


def test_refuses_to_overwrite_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cloud.pem").write_text("someone else's file")
    assert main(["certs", "init", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cloud.pem" in err and "--force" in err
    assert snapshot(tmp_path) == {"cloud.pem": b"someone else's file"}  # not even ca.pem

    done = tmp_path / "done"
    init_pki(done)
    before = snapshot(done)
    with pytest.raises(PkiExistsError) as excinfo:
        init_pki(done, apps=["demo-app", "new-app"])
    assert {p.name for p in excinfo.value.paths} >= {"ca.key", "node.pem", "audit-signing.pub"}
    assert snapshot(done) == before


AUDIT_KEYPAIR = {"audit-signing.key", "audit-signing.pub"}


def test_the_refusal_says_what_force_replaces_and_what_it_keeps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init_pki(tmp_path)
    assert main(["certs", "init", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "audit-signing.key" in err and "nothing was written" in err
    assert "--force makes a new CA and replaces every certificate and key" in err
    assert "it keeps audit-signing.key/.pub, which existing audit trails verify with" in err


def test_force_replaces_everything_but_the_audit_keypair_and_keeps_keys_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init_pki(tmp_path)
    before = snapshot(tmp_path)
    assert main(["certs", "init", "--out", str(tmp_path), "--force"]) == 0
    after = snapshot(tmp_path)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before.keys() - AUDIT_KEYPAIR)
    assert all(after[name] == before[name] for name in AUDIT_KEYPAIR)  # trails stay verifiable
    out = capsys.readouterr().out
    assert "kept the existing audit signing keypair" in out and "--key OLD.pub" in out
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_force_writes_a_missing_audit_pub_from_the_kept_key(tmp_path: Path) -> None:
    init_pki(tmp_path)
    pub = (tmp_path / "audit-signing.pub").read_bytes()
    (tmp_path / "audit-signing.pub").unlink()
    issued = init_pki(tmp_path, force=True)
    assert (tmp_path / "audit-signing.pub").read_bytes() == pub
    assert [i.kept for i in issued if i.identity == "audit-signing"] == [True]


def test_force_refuses_an_audit_pub_without_its_key_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init_pki(tmp_path)
    (tmp_path / "audit-signing.key").unlink()
    before = snapshot(tmp_path)
    assert main(["certs", "init", "--out", str(tmp_path), "--force"]) == 2
    assert "audit-signing.pub exists without its private key" in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # the old .pub still verifies the old trails


def test_issue_never_writes_over_the_audit_signing_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init_pki(tmp_path)
    before = snapshot(tmp_path)
    argv = ["certs", "issue", "x", "--client", "--ca-dir", str(tmp_path), "--force"]
    assert main([*argv, "--stem", "audit-signing"]) == 2
    assert "audit signing key" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_issue_makes_a_missing_output_directory(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "peers"
    argv = ["certs", "issue", "peer", "--client", "--ca-dir", str(pki), "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["peer.key", "peer.pem"]
    assert stat.S_IMODE((out / "peer.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "x" * 30 + "." + "y" * 39])
def test_issue_says_a_name_cannot_be_a_cn(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    argv = ["certs", "issue", name, "--client", "--ca-dir", str(pki), "--out", str(tmp_path)]
    assert main([*argv, "--san", "peer.example.test"]) == 2
    assert "it becomes the CN of its certificate, which holds 1 to 64" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_issue_never_writes_a_leaf_over_the_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init_pki(tmp_path)
    before = snapshot(tmp_path)
    assert main(["certs", "issue", "ca", "--server", "--ca-dir", str(tmp_path), "--force"]) == 2
    assert "are the CA's" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_issue_refuses_a_ca_key_that_is_not_the_ca_certificates(
    tmp_path: Path, other_pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Signing with another key would make a leaf that nothing trusts, silently."""
    init_pki(tmp_path)
    shutil.copy(PkiLayout(other_pki).ca.key, tmp_path / "ca.key")
    before = snapshot(tmp_path)
    assert main(["certs", "issue", "extra", "--client", "--ca-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ca.key: private key does not match the CA certificate" in err
    assert snapshot(tmp_path) == before


def test_issue_from_an_expired_ca_says_so_and_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert main(["certs", "issue", "extra", "--client", "--ca-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"the CA expired on {ca.not_valid_after_utc:%Y-%m-%d}" in err
    assert "certs init" in err and "--force" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]


def test_cli_prints_a_table_of_what_it_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pki"
    code = main(["certs", "init", "--out", str(out), "--app", "billing", "--san", "gw.test"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["FILE", "IDENTITY", "SANS", "USAGE", "EXPIRES"]
    router = next(line for line in lines if line.startswith("router.pem"))
    assert "server+client" in router and "gw.test" in router and "127.0.0.1" in router
    expiry = load_cert(out / "router.pem").not_valid_after_utc.strftime("%Y-%m-%d")
    assert router.rstrip().endswith(expiry)
    app = next(line for line in lines if line.startswith("app-billing.pem"))
    assert app.split()[2:4] == ["billing", "billing"] and "client" in app
    assert any(line.startswith("audit-signing.pub") for line in lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "router"], "reserved"),
        (["--app", "../evil"], "not a valid DNS name"),
        (["--san", "bad host"], "not a valid DNS name"),
        (["--app", "x" * 30 + "." + "y" * 39], "has 70 characters; it becomes the CN"),
    ],
)
def test_cli_rejects_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["certs", "init", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_issue_leaf_and_describe(pki: Path, tmp_path: Path) -> None:
    issued = issue_leaf(pki, "batch-job", client=True, out=tmp_path, days=7)
    info = describe_certificate(issued.cert)
    assert (info.common_name, info.sans, info.usages, info.is_ca) == (
        "batch-job",
        ("batch-job",),
        ("client",),
        False,
    )
    assert info.issuer == "hybridroute dev CA" and not info.expired
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600
    assert describe_certificate(PkiLayout(pki).ca.cert).is_ca
    with pytest.raises(PkiExistsError):
        issue_leaf(pki, "batch-job", client=True, out=tmp_path)


# --- credential errors -------------------------------------------------------------------


def test_missing_and_non_pem_files_name_the_path(pki: Path, tmp_path: Path) -> None:
    layout = PkiLayout(pki)
    missing = tmp_path / "nope.pem"
    with pytest.raises(CredentialsError, match=r"nope\.pem") as excinfo:
        server_credentials(missing, layout.node.key, None)
    assert isinstance(excinfo.value.__cause__, FileNotFoundError)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(CredentialsError, match=r"junk\.pem.*not a PEM"):
        channel_credentials(junk)
    with pytest.raises(CredentialsError, match="does not match"):
        server_credentials(layout.node.cert, layout.cloud.key, layout.ca.cert)
    with pytest.raises(CredentialsError, match="together"):
        channel_credentials(layout.ca.cert, layout.app("demo-app").cert)


# --- mutual TLS --------------------------------------------------------------------------


def test_mtls_accepts_an_app_certificate_and_sees_its_identity(
    pki: Path, mtls_node: HealthServer
) -> None:
    layout = PkiLayout(pki)
    assert (
        check(mtls_node.port, channel_credentials(layout.ca.cert, *layout.app("demo-app").files()))
        == SERVING
    )
    assert (
        check(mtls_node.port, channel_credentials(layout.ca.cert, *layout.router.files()))
        == SERVING
    )
    # CN and DNS SANs; the router's IP SANs are not identities.
    assert mtls_node.servicer.callers == [
        frozenset({"demo-app"}),
        frozenset({"router", "localhost"}),
    ]


def test_mtls_rejects_a_client_without_certificate(pki: Path, mtls_node: HealthServer) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        check(mtls_node.port, channel_credentials(PkiLayout(pki).ca.cert))
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_node.servicer.callers == []


def test_mtls_rejects_a_certificate_from_another_ca(
    pki: Path, other_pki: Path, mtls_node: HealthServer
) -> None:
    stranger = PkiLayout(other_pki).app("demo-app")
    with pytest.raises(grpc.RpcError) as excinfo:
        check(mtls_node.port, channel_credentials(PkiLayout(pki).ca.cert, *stranger.files()))
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_node.servicer.callers == []


def test_client_refuses_a_server_from_another_ca(
    pki: Path, other_pki: Path, serve: type[HealthServer]
) -> None:
    impostor = PkiLayout(other_pki).node
    server = serve(server_credentials(impostor.cert, impostor.key, PkiLayout(pki).ca.cert))
    layout = PkiLayout(pki)
    with pytest.raises(grpc.RpcError) as excinfo:
        check(server.port, channel_credentials(layout.ca.cert, *layout.router.files()))
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE


def test_no_identities_without_client_certificate_or_tls(
    pki: Path, serve: type[HealthServer]
) -> None:
    layout = PkiLayout(pki)
    tls_only = serve(server_credentials(layout.node.cert, layout.node.key, None))
    assert check(tls_only.port, channel_credentials(layout.ca.cert)) == SERVING
    plaintext = serve(None)
    assert check(plaintext.port, None) == SERVING
    assert tls_only.servicer.callers == plaintext.servicer.callers == [frozenset()]


def test_peer_identities_on_an_aio_server(pki: Path) -> None:
    layout = PkiLayout(pki)
    seen: list[frozenset[str]] = []

    class AioHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped stubs
        async def Check(
            self,
            request: health_pb2.HealthCheckRequest,
            context: grpc.aio.ServicerContext[Any, Any],
        ) -> health_pb2.HealthCheckResponse:
            seen.append(peer_identities(context))
            return health_pb2.HealthCheckResponse(status=SERVING)

    async def scenario() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(AioHealth(), server)
        creds = server_credentials(layout.node.cert, layout.node.key, layout.ca.cert)
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        client = channel_credentials(layout.ca.cert, *layout.app("other-app").files())
        options = [("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", client, options=options) as ch:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        await server.stop(None)

    asyncio.run(scenario())
    assert seen == [frozenset({"other-app"})]


# --- rotation ----------------------------------------------------------------------------


def test_rotated_files_are_served_to_new_connections_without_restart(
    pki: Path, tmp_path: Path, serve: type[HealthServer], caplog: pytest.LogCaptureFixture
) -> None:
    layout, live = PkiLayout(pki), PkiLayout(tmp_path)
    for path in layout.node.files():
        shutil.copy2(path, tmp_path / path.name)
    server = serve(server_credentials(live.node.cert, live.node.key, layout.ca.cert))
    app = channel_credentials(layout.ca.cert, *layout.app("demo-app").files())
    assert (
        served_certificate(server.port, pki).serial_number
        == load_cert(layout.node.cert).serial_number
    )
    old = grpc.secure_channel(
        f"127.0.0.1:{server.port}", app, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    assert (
        health_pb2_grpc.HealthStub(old).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == SERVING
    )

    # Rotate in place: a new key and a certificate with another CN, serial and SAN.
    issue_leaf(
        pki, "node-v2", server=True, sans=["rotated.test"], out=tmp_path, stem="node", force=True
    )
    rotated = load_cert(live.node.cert)
    assert served_certificate(server.port, pki).serial_number == rotated.serial_number
    assert check(server.port, app, server_name="rotated.test") == SERVING
    with pytest.raises(grpc.RpcError):  # the old name is gone from the served certificate
        check(server.port, app, server_name="localhost")
    # The connection opened before the rotation carries on.
    assert (
        health_pb2_grpc.HealthStub(old).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == SERVING
    )
    old.close()

    # A key that does not match (e.g. caught between two renames): keep the last good pair.
    with caplog.at_level(logging.WARNING, logger="hybridroute.certs.credentials"):
        shutil.copy(layout.cloud.key, live.node.key)
        assert served_certificate(server.port, pki).serial_number == rotated.serial_number
        live.node.cert.write_text("-----BEGIN CERTIFICATE-----\ntruncat")  # half-written
        assert check(server.port, app, server_name="rotated.test") == SERVING
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("does not match" in w and "CN=node-v2" in w for w in warnings)
    assert any("node.pem" in w for w in warnings[1:])


def mint_node_cert(
    pki: Path, out: Path, *, cn: str, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    """A server certificate from the session CA with exactly this validity (which
    `issue_leaf` will not make), written over `out`'s node.pem/node.key."""
    return mint_leaf(
        pki,
        out,
        "node",
        cn=cn,
        dns=["localhost"],
        server=True,
        not_before=not_before,
        not_after=not_after,
    )


def served_serial(port: int) -> int:
    """The serial of the certificate a new TLS connection is given, whatever its dates."""
    return served_certificate(port).serial_number


def tls_only_node(pki: Path, tmp_path: Path, serve: type[HealthServer]) -> HealthServer:
    """A TLS server on a copy of the session's node pair in `tmp_path`, to rotate."""
    for path in PkiLayout(pki).node.files():
        shutil.copy2(path, tmp_path / path.name)
    live = PkiLayout(tmp_path).node
    return serve(server_credentials(live.cert, live.key, None))


def test_a_server_does_not_start_on_an_expired_certificate(pki: Path, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    mint_node_cert(pki, tmp_path, cn="stale", not_before=now - 9 * day, not_after=now - day)
    live = PkiLayout(tmp_path).node
    with pytest.raises(CredentialsError, match=r"node\.pem: certificate CN=stale .* has expired"):
        server_credentials(live.cert, live.key, PkiLayout(pki).ca.cert)


def test_rotation_ignores_an_expired_certificate_and_says_so(
    pki: Path, tmp_path: Path, serve: type[HealthServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = tls_only_node(pki, tmp_path, serve)
    serving = load_cert(PkiLayout(pki).node.cert).serial_number
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    with caplog.at_level(logging.WARNING, logger="hybridroute.certs.credentials"):
        mint_node_cert(pki, tmp_path, cn="stale", not_before=now - 9 * day, not_after=now - day)
        assert served_serial(server.port) == serving
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "still serving CN=node" in warning and "CN=stale" in warning
    assert "has expired" in warning


def test_a_rotated_certificate_not_valid_yet_is_served_from_its_start(
    pki: Path, tmp_path: Path, serve: type[HealthServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = tls_only_node(pki, tmp_path, serve)
    serving = load_cert(PkiLayout(pki).node.cert).serial_number
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=2)
    with caplog.at_level(logging.INFO, logger="hybridroute.certs.credentials"):
        early = mint_node_cert(
            pki, tmp_path, cn="early", not_before=start, not_after=start + dt.timedelta(days=1)
        )
        assert served_serial(server.port) == serving  # clients would refuse it for now
        time.sleep(max(0.0, (start - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)
        assert served_serial(server.port) == early.serial_number
        assert served_serial(server.port) == early.serial_number
    messages = [r.getMessage() for r in caplog.records]
    assert any("not valid before" in m and "still serving CN=node" in m for m in messages)
    assert any("reloaded server certificate CN=early" in m for m in messages)


def test_serving_a_certificate_past_its_expiry_is_logged_once(
    pki: Path, tmp_path: Path, serve: type[HealthServer], caplog: pytest.LogCaptureFixture
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    end = now + dt.timedelta(seconds=2)
    short = mint_node_cert(
        pki, tmp_path, cn="short", not_before=now - dt.timedelta(minutes=5), not_after=end
    )
    live = PkiLayout(tmp_path).node
    server = serve(server_credentials(live.cert, live.key, None))
    with caplog.at_level(logging.ERROR, logger="hybridroute.certs.credentials"):
        assert served_serial(server.port) == short.serial_number
        assert not caplog.records
        time.sleep(max(0.0, (end - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)
        for _ in range(3):
            served_serial(server.port)
    (error,) = [r.getMessage() for r in caplog.records]
    assert "CN=short" in error and "past its expiry" in error and "certs issue" in error


def test_node_serve_names_an_expired_certificate_without_a_traceback(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    mint_node_cert(pki, tmp_path, cn="stale", not_before=now - 9 * day, not_after=now - day)
    live = PkiLayout(tmp_path).node
    models = tmp_path / "models"
    models.mkdir()
    argv = ["node", "serve", "--models", str(models), "--listen", "127.0.0.1:0"]
    argv += ["--cert", str(live.cert), "--key", str(live.key)]
    assert main([*argv, "--client-ca", str(PkiLayout(pki).ca.cert)]) == 2
    err = capsys.readouterr().err
    assert "hybridroute: error:" in err and "CN=stale" in err and "has expired" in err


def test_a_key_made_readable_after_rotation_is_picked_up(
    pki: Path,
    tmp_path: Path,
    serve: type[HealthServer],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rotated files written by another user: the server cannot read the key until the
    operator runs chmod/chown, which changes neither the key's mtime nor its size."""
    server = tls_only_node(pki, tmp_path, serve)
    live = PkiLayout(tmp_path).node
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:  # what the kernel does for a non-root server
        if path == live.key and not stat.S_IMODE(path.stat().st_mode) & stat.S_IRUSR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    serving = load_cert(live.cert).serial_number
    with caplog.at_level(logging.WARNING, logger="hybridroute.certs.credentials"):
        issue_leaf(pki, "node-v2", server=True, out=tmp_path, stem="node", force=True)
        os.chmod(live.key, 0)
        assert served_serial(server.port) == serving
    assert "Permission denied" in caplog.records[-1].getMessage()
    os.chmod(live.key, 0o600)  # the fix: the mtime and the size stay as they were
    assert served_serial(server.port) == load_cert(live.cert).serial_number


def test_the_audit_trail_notes_a_key_made_readable_after_rotation(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`CertWatch` (the router's cert.change notes) re-reads a key that could not be read
    once chmod/chown fixes it, though its content, size and mtime stay the same."""
    from hybridroute.router.audit.notes import CertWatch
    from hybridroute.router.config import RouterConfig

    layout, live = PkiLayout(pki), PkiLayout(tmp_path)
    for path in (*layout.router.files(), layout.ca.cert):
        shutil.copy2(path, tmp_path / path.name)
    config = RouterConfig(
        tls={"cert": live.router.cert, "key": live.router.key},
        policy=tmp_path / "policy.yaml",
        upstream={"ca": live.ca.cert, "cert": layout.router.cert, "key": layout.router.key},
    )
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:  # what the kernel does for a non-root router
        if path == live.router.key and not stat.S_IMODE(path.stat().st_mode) & stat.S_IRUSR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    watch = CertWatch(config)
    staged = tmp_path / "rotated.key"
    shutil.copy(layout.node.key, staged)  # another key, put in place by another user
    os.chmod(staged, 0)
    os.replace(staged, live.router.key)
    (unreadable,) = watch.changes()
    assert "Permission denied" in str(unreadable.fields["after"])
    time.sleep(0.05)  # a tick of the file system's clock between the two changes
    os.chmod(live.router.key, 0o600)  # the fix: the mtime and the size stay as they were
    (readable,) = watch.changes()
    assert readable.fields["role"] == "tls.key"
    assert readable.fields["after"] == {"public_key_sha256": _public_sha256(layout.node.key)}


def _public_sha256(key_path: Path) -> str:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()
