"""Caller authentication at the router's front door.

A caller is identified by its TLS client certificate (CN, else its first DNS SAN),
verified against the configured CA by the TLS layer, or by a bearer token whose
SHA-256 the router config lists. grpc's Python server cannot make client
certificates optional on a port, so token callers use the `token_listen` port (TLS
without client certificates). A caller with neither is UNAUTHENTICATED.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hybridroute.certs.credentials import peer_identities
from hybridroute.router.config import RouterConfig
from hybridroute.router.facts import Caller

__all__ = ["Unauthenticated", "authenticate"]

_AUTH_CN = "x509_common_name"
_AUTH_DNS = "peer_dns"
_AUTH_CERT = "x509_pem_cert"


class _Fixed:
    """An auth context already read, in the shape `peer_identities` takes."""

    __slots__ = ("_auth",)

    def __init__(self, auth: Mapping[str, Any]) -> None:
        self._auth = auth

    def auth_context(self) -> Mapping[str, Any]:
        return self._auth


class Unauthenticated(Exception):
    """No valid credentials; the message says what was missing, never the token."""


def _certificate_identity(auth: Mapping[str, Any]) -> str | None:
    """The CN of the verified client certificate, else its first DNS SAN (in the
    certificate's order, which grpc keeps); None without a certificate or a name."""
    names = peer_identities(_Fixed(auth))
    for key in (_AUTH_CN, _AUTH_DNS):
        for raw in auth.get(key, []):
            value = str(raw.decode("utf-8", "replace"))
            if value in names:
                return value
    return None


def authenticate(context: Any, metadata: Mapping[str, str], config: RouterConfig) -> Caller:
    """The caller of this RPC, or `Unauthenticated`."""
    auth = context.auth_context()  # built anew on every call: read it once
    identity = _certificate_identity(auth)
    if identity is not None:
        return Caller(identity, "cert")
    header = metadata.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        caller = config.caller_for_token(token.strip())
        if caller is None:
            raise Unauthenticated("bearer token not recognised")
        return Caller(caller, "token")
    if config.insecure:
        return Caller(None, "none")
    if auth.get(_AUTH_CERT):
        raise Unauthenticated(
            "the client certificate names no caller (no CN and no DNS SAN): issue one "
            "with 'hybridroute certs issue NAME --client --ca-dir DIR', or send "
            "'authorization: Bearer <token>'"
        )
    raise Unauthenticated(
        "no client certificate and no bearer token: present a certificate signed by the "
        "router's client CA, or send 'authorization: Bearer <token>'"
    )
