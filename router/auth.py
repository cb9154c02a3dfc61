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


class _Fixed:
    """An auth context already read, in the shape `peer_identities` takes."""

    __slots__ = ("_auth",)

    def __init__(self, auth: Mapping[str, Any]) -> None:
        self._auth = auth

    def auth_context(self) -> Mapping[str, Any]:
        return self._auth


class Unauthenticated(Exception):
    """No valid credentials; the message says what was missing, never the token."""


def _certificate_identity(context: Any) -> str | None:
    auth = context.auth_context()  # built anew on every call: read it once
    names = peer_identities(_Fixed(auth))
    if not names:
        return None
    cn = auth.get(_AUTH_CN, [])
    for raw in cn:
        value = str(raw.decode("utf-8", "replace"))
        if value in names:
            return value
    return sorted(names)[0]


def authenticate(context: Any, metadata: Mapping[str, str], config: RouterConfig) -> Caller:
    """The caller of this RPC, or `Unauthenticated`."""
    identity = _certificate_identity(context)
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
    raise Unauthenticated(
        "no client certificate and no bearer token: present a certificate signed by the "
        "router's client CA, or send 'authorization: Bearer <token>'"
    )
