"""Caller authentication at the router's front door (`router/auth.py`), against a real
gRPC server over TLS: the mutual-TLS port and the token port (TLS, no client
certificate), with certificates minted at test time from the session CA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from support import mint_leaf

from hybridroute.certs.credentials import channel_credentials, server_credentials
from hybridroute.certs.pki import PkiLayout, init_pki
from hybridroute.router.auth import Unauthenticated, authenticate
from hybridroute.router.config import RouterConfig, hash_token

TOKEN = "hrt_" + "t" * 43
METHOD = "/hybridroute.test.Auth/Who"


@dataclass(frozen=True)
class Ports:
    mtls: int  # client certificates required, verified against the session CA
    token: int  # TLS without client certificates


@pytest.fixture(scope="module")
def router(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    """A server answering `Who` with `authenticate`'s verdict: "identity|auth", or
    UNAUTHENTICATED with its message."""
    layout = PkiLayout(pki)
    here = tmp_path_factory.mktemp("auth")
    config = RouterConfig(
        tls={"cert": layout.router.cert, "key": layout.router.key, "client_ca": layout.ca.cert},
        policy=here / "policy.yaml",
        upstream={"ca": layout.ca.cert, "cert": layout.router.cert, "key": layout.router.key},
        tokens=[{"caller": "batch-job", "sha256": hash_token(TOKEN)}],
    )

    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        try:
            caller = authenticate(context, metadata, config)
        except Unauthenticated as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return f"{caller.identity}|{caller.auth}".encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(who)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("hybridroute.test.Auth", {"Who": handler})]
    )
    creds = server_credentials(layout.router.cert, layout.router.key, layout.ca.cert)
    mtls = server.add_secure_port("127.0.0.1:0", creds)
    token_creds = server_credentials(layout.router.cert, layout.router.key, None)
    token = server.add_secure_port("127.0.0.1:0", token_creds)
    server.start()
    yield Ports(mtls, token)
    server.stop(None)


def who(port: int, creds: grpc.ChannelCredentials, authorization: str | None = None) -> str:
    options = [
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    metadata = None if authorization is None else [("authorization", authorization)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        reply = channel.unary_unary(METHOD)(b"", metadata=metadata, timeout=5)
    return bytes(reply).decode()


def refusal(port: int, creds: grpc.ChannelCredentials, authorization: str | None = None) -> str:
    with pytest.raises(grpc.RpcError) as excinfo:
        who(port, creds, authorization)
    error: Any = excinfo.value
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    return str(error.details())


def mint_client(
    pki: Path,
    out: Path,
    *,
    cn: str | None,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> grpc.ChannelCredentials:
    """A client certificate from the session CA with exactly this subject and these SANs
    (what another tool might issue), as channel credentials."""
    mint_leaf(pki, out, "client", cn=cn, organization="elsewhere", dns=dns, ips=ips, client=True)
    return channel_credentials(PkiLayout(pki).ca.cert, out / "client.pem", out / "client.key")


def app(pki: Path, name: str) -> grpc.ChannelCredentials:
    layout = PkiLayout(pki)
    return channel_credentials(layout.ca.cert, *layout.app(name).files())


def server_only(pki: Path) -> grpc.ChannelCredentials:
    return channel_credentials(PkiLayout(pki).ca.cert)


# --- certificates ------------------------------------------------------------------------


def test_the_identity_is_the_cn_even_with_other_dns_sans(pki: Path, router: Ports) -> None:
    assert who(router.mtls, app(pki, "demo-app")) == "demo-app|cert"
    layout = PkiLayout(pki)
    router_cert = channel_credentials(layout.ca.cert, *layout.router.files())
    assert who(router.mtls, router_cert) == "router|cert"  # SANs: router, localhost, IPs


def test_without_a_cn_the_identity_is_the_first_dns_san(
    pki: Path, router: Ports, tmp_path: Path
) -> None:
    """grpc reports a missing CN as an empty one: that is not the caller's name."""
    creds = mint_client(pki, tmp_path, cn=None, dns=["zeta-app", "alpha-app"])
    assert who(router.mtls, creds) == "zeta-app|cert"


def test_a_certificate_without_any_name_is_refused_and_says_why(
    pki: Path, router: Ports, tmp_path: Path
) -> None:
    creds = mint_client(pki, tmp_path, cn=None, ips=["127.0.0.1"])
    message = refusal(router.mtls, creds)
    assert "no CN and no DNS SAN" in message and "certs issue" in message
    # A valid token still identifies the caller.
    assert who(router.mtls, creds, f"Bearer {TOKEN}") == "batch-job|token"


def test_a_verified_certificate_wins_over_a_token(pki: Path, router: Ports) -> None:
    assert who(router.mtls, app(pki, "other-app"), f"Bearer {TOKEN}") == "other-app|cert"


def test_the_token_port_never_takes_an_identity_from_a_certificate(
    pki: Path, router: Ports, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No client certificate is requested there, so a stranger's cert names nobody."""
    stranger = tmp_path_factory.mktemp("stranger-pki")
    init_pki(stranger)
    other = PkiLayout(stranger)
    creds = channel_credentials(PkiLayout(pki).ca.cert, *other.router.files())
    assert "no client certificate and no bearer token" in refusal(router.token, creds)
    assert who(router.token, creds, f"Bearer {TOKEN}") == "batch-job|token"


# --- tokens ------------------------------------------------------------------------------


def test_tokens_on_the_token_port(pki: Path, router: Ports) -> None:
    creds = server_only(pki)
    assert who(router.token, creds, f"Bearer {TOKEN}") == "batch-job|token"
    assert who(router.token, creds, f"bearer   {TOKEN}  ") == "batch-job|token"
    wrong = TOKEN[:-1] + "x"
    message = refusal(router.token, creds, f"Bearer {wrong}")
    assert message == "bearer token not recognised" and wrong not in message


@pytest.mark.parametrize("header", ["Bearer", "Bearer   ", f"Basic {TOKEN}", TOKEN])
def test_a_malformed_authorization_header_is_refused_without_echoing_it(
    pki: Path, router: Ports, header: str
) -> None:
    message = refusal(router.token, server_only(pki), header)
    assert "must be 'Bearer <token>'" in message and TOKEN not in message
