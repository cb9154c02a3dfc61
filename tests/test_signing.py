"""Signed policies: the envelope, keygen/sign/verify, the policy store's refusals, and a
real router that refuses unsigned or tampered policies at start and at reload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from support import HYBRIDROUTE, LoopThread, free_port, mtls_channel
from test_router import _policy_text
from test_router_e2e import CLEAN, ticket

from hybridroute.cli import main
from hybridroute.config import ConfigError
from hybridroute.node.server import NodeOptions, NodeServer
from hybridroute.protos import admin_pb2, admin_pb2_grpc
from hybridroute.protos import inference_pb2_grpc as pb_grpc
from hybridroute.router.audit.codec import load_verify_key
from hybridroute.router.audit.db import connect_writer
from hybridroute.router.audit.notes import newest_signed_policy, policy_note
from hybridroute.router.audit.store import AuditStore
from hybridroute.router.audit.verify import prune
from hybridroute.router.config import AuditConfig, load_config
from hybridroute.router.policy.schema import Policy
from hybridroute.router.policy.signing import (
    PolicySignature,
    SignatureError,
    generate_keypair,
    load_signing_key,
    load_trusted_key,
    sign_policy,
    verify_policy_bytes,
)
from hybridroute.router.policy.store import PolicyStore, ReloadResult
from hybridroute.router.server import RouterServer
from hybridroute.stack import default_policy_path

POLICY = default_policy_path().read_bytes()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """secteam's keypair and a stranger's, made once."""
    root = tmp_path_factory.mktemp("keys")
    generate_keypair(root, "secteam")
    generate_keypair(root, "stranger")
    return root


def signed(path: Path, keys: Path, data: bytes = POLICY, signer: str = "secteam") -> Path:
    path.write_bytes(data)
    key = load_signing_key(keys / f"{signer}.key")
    path.with_name(path.name + ".sig").write_bytes(sign_policy(data, key))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- the envelope ----------------------------------------------------------------------


def test_a_signature_binds_the_exact_bytes_signer_key_and_time(keys: Path) -> None:
    trusted = load_trusted_key(keys / "secteam.pub")
    envelope = sign_policy(POLICY, load_signing_key(keys / "secteam.key"), now=1_700_000_000)
    found = verify_policy_bytes(POLICY, envelope, trusted)
    assert (found.signer, found.signed_at, found.key_id) == (
        "secteam",
        1_700_000_000,
        trusted.key_id,
    )
    data = json.loads(envelope)
    assert data["format"] == "hybridroute-policy-signature/v1"
    assert data["signed_at"] == "2023-11-14T22:13:20Z"
    for i in (0, len(POLICY) // 2, len(POLICY) - 1):  # one byte of the policy changed
        tampered = bytearray(POLICY)
        tampered[i] ^= 0x01
        with pytest.raises(SignatureError, match="the policy changed after it was signed"):
            verify_policy_bytes(bytes(tampered), envelope, trusted)
    for field, value in (("signer", "mallory"), ("signed_at", "2030-01-01T00:00:00Z")):
        forged = json.dumps({**data, field: value}).encode()
        with pytest.raises(SignatureError, match="does not verify"):
            verify_policy_bytes(POLICY, forged, trusted)


def test_other_keys_and_malformed_envelopes_are_refused(keys: Path, tmp_path: Path) -> None:
    trusted = load_trusted_key(keys / "secteam.pub")
    other = sign_policy(POLICY, load_signing_key(keys / "stranger.key"))
    with pytest.raises(SignatureError, match="not the trusted key"):
        verify_policy_bytes(POLICY, other, trusted)
    for bad, message in [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"format": "x"}', "unknown signature format"),
        (b'{"format": "hybridroute-policy-signature/v1"}', "lacks policy_sha256"),
    ]:
        with pytest.raises(SignatureError, match=message):
            verify_policy_bytes(POLICY, bad, trusted)
    # A key file without a declared signer (as openssl writes it) may sign as anyone;
    # a trusted key that declares its signer then insists on that name.
    bare = ed25519.Ed25519PrivateKey.generate()
    pem = bare.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "bare.key").write_bytes(pem)
    pub = bare.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "bare.pub").write_bytes(b"# signer: secteam\n" + pub)
    key = load_signing_key(tmp_path / "bare.key")
    with pytest.raises(ValueError, match="names no signer"):
        sign_policy(POLICY, key)
    claimed = sign_policy(POLICY, key, signer="mallory")
    with pytest.raises(SignatureError, match="claims signer 'mallory'"):
        verify_policy_bytes(POLICY, claimed, load_trusted_key(tmp_path / "bare.pub"))


def test_key_files_are_checked(keys: Path, tmp_path: Path) -> None:
    from hybridroute.router.policy.signing import KeyFileError

    assert os.stat(keys / "secteam.key").st_mode & 0o777 == 0o600
    with pytest.raises(KeyFileError, match="holds a private key"):
        load_trusted_key(keys / "secteam.key")
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.key").write_bytes(ec_key)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_signing_key(tmp_path / "ec.key")
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_trusted_key(tmp_path / "missing.pub")
    with pytest.raises(FileExistsError):
        generate_keypair(keys, "secteam")


# --- the commands ---------------------------------------------------------------------


def test_keygen_sign_verify_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "keygen", "--out", tmp_path / "k", "--signer", "secteam")
    assert code == 0 and "require_signed_policy: true" in out
    assert "policy_public_key: " + str((tmp_path / "k" / "secteam.pub").resolve()) in out
    code, _, err = run(capsys, "policy", "keygen", "--out", tmp_path / "k", "--signer", "secteam")
    assert code == 2 and "exists (use --force" in err
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(POLICY)
    key, pub = tmp_path / "k" / "secteam.key", tmp_path / "k" / "secteam.pub"
    code, out, _ = run(capsys, "policy", "sign", policy, "--key", key)
    assert code == 0 and f"signature written to {policy}.sig" in out
    code, out, _ = run(capsys, "policy", "verify", policy, "--key", pub)
    assert code == 0 and "verified" in out and "signed by  secteam (key " in out
    policy.write_bytes(POLICY.replace(b"pin_ttl: 30m", b"pin_ttl: 40m"))
    code, out, _ = run(capsys, "policy", "verify", policy, "--key", pub)
    assert code == 1 and "NOT VERIFIED: the policy changed after it was signed" in out
    future = sign_policy(POLICY, load_signing_key(key), now=time.time() + 3600)
    policy.write_bytes(POLICY)
    policy.with_name("policy.yaml.sig").write_bytes(future)
    code, out, _ = run(capsys, "policy", "verify", policy, "--key", pub)
    assert code == 1 and "NOT VERIFIED: signed at " in out and "60 minutes ahead" in out
    code, out, _ = run(capsys, "policy", "verify", tmp_path / "k" / "secteam.pub", "--key", pub)
    assert code == 1 and "NOT VERIFIED: not signed: no signature file" in out
    code, _, err = run(capsys, "policy", "verify", policy, "--key", key)
    assert code == 2 and "holds a private key" in err


def test_sign_refuses_an_invalid_policy(tmp_path: Path, keys: Path, capsys) -> None:
    policy = tmp_path / "leaky.yaml"
    policy.write_bytes(POLICY.replace(b"{label: [public], sensitive: false}", b"{label: [public]}"))
    code, _, err = run(capsys, "policy", "sign", policy, "--key", keys / "secteam.key")
    assert code == 1 and "can send sensitive requests to cloud pool" in err
    assert "not signed: fix the errors first" in err
    assert not (tmp_path / "leaky.yaml.sig").exists()
    code, _, err = run(
        capsys, "policy", "sign", policy, "--key", keys / "secteam.key", "--signer", "x"
    )
    assert code == 2 and "belongs to signer 'secteam'" in err


def test_sign_refuses_a_missing_pool_file_and_warns_of_an_unset_token_variable(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router refuses a policy whose pool files are missing; whether the token
    variable is set on the router cannot be known here, so that is only a warning."""
    key = keys / "secteam.key"
    policy = tmp_path / "policy.yaml"
    token = b"bearer_token_env: HYBRIDROUTE_CLOUD_TOKEN"
    policy.write_bytes(POLICY.replace(token, b"bearer_token_file: cloud.token"))
    code, _, err = run(capsys, "policy", "sign", policy, "--key", key)
    assert code == 1 and "pools.cloud.bearer_token_file: bearer_token_file cloud.token" in err
    assert "not signed: fix the errors first" in err and not (tmp_path / "policy.yaml.sig").exists()
    policy.write_bytes(POLICY)
    monkeypatch.delenv("HYBRIDROUTE_CLOUD_TOKEN", raising=False)
    code, out, err = run(capsys, "policy", "sign", policy, "--key", key)
    line = POLICY.split(token)[0].count(b"\n") + 1
    assert code == 0 and f"signature written to {policy}.sig" in out
    assert err == (
        f"{policy}:{line}: pools.cloud.bearer_token_env: warning: environment variable "
        "HYBRIDROUTE_CLOUD_TOKEN is not set here; a router refuses this policy unless it is "
        "set (and not empty) in the router's environment\n"
    )
    monkeypatch.setenv("HYBRIDROUTE_CLOUD_TOKEN", "t0ken")
    assert run(capsys, "policy", "sign", policy, "--key", key)[::2] == (0, "")


def test_sign_never_writes_over_the_policy_or_the_key(
    tmp_path: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(POLICY)
    key = tmp_path / "secteam.key"
    shutil.copy(keys / "secteam.key", key)
    (tmp_path / "sub").mkdir()
    os.symlink(policy, tmp_path / "link.yaml")
    for out in (policy, tmp_path / "sub" / ".." / "policy.yaml", tmp_path / "link.yaml"):
        code, _, err = run(capsys, "policy", "sign", policy, "--key", key, "--out", out)
        assert code == 2 and f"--out {out} is the policy ({policy})" in err
    code, _, err = run(capsys, "policy", "sign", policy, "--key", key, "--out", key)
    assert code == 2 and "is the signing key" in err
    assert policy.read_bytes() == POLICY
    assert key.read_bytes() == (keys / "secteam.key").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "link.yaml",
        "policy.yaml",
        "secteam.key",
        "sub",
    ]


def test_router_config_needs_a_key_to_require_signatures(tmp_path: Path) -> None:
    base = "listen: 127.0.0.1:1\ninsecure: true\npolicy: p.yaml\n"
    base += "upstream: {ca: ca.pem, cert: r.pem, key: r.key}\n"
    config = tmp_path / "router.yaml"
    config.write_text(base + "require_signed_policy: true\n")
    with pytest.raises(ConfigError, match="require_signed_policy needs policy_public_key"):
        load_config(config)
    config.write_text(base + "require_signed_policy: true\npolicy_public_key: keys/team.pub\n")
    assert load_config(config).policy_public_key == tmp_path / "keys" / "team.pub"


# --- the policy store -----------------------------------------------------------------


async def _no_apply(policy: Policy) -> None:
    return None


def _store(path: Path, keys: Path, results: list[ReloadResult], **kw: object) -> PolicyStore:
    return PolicyStore(
        path,
        _no_apply,
        public_key=keys / "secteam.pub",
        require_signed=True,
        on_result=results.append,
        **kw,  # type: ignore[arg-type]
    )


def test_the_store_refuses_an_unsigned_policy_at_start(tmp_path: Path, keys: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(POLICY)
    results: list[ReloadResult] = []
    with pytest.raises(ConfigError, match=r"policy refused: not signed: no signature file"):
        _store(policy, keys, results)
    assert [(r.accepted, r.why) for r in results] == [(False, "start")]
    signed(policy, keys, signer="stranger")
    with pytest.raises(ConfigError, match=r"signed with key \w+, not the trusted key"):
        _store(policy, keys, results)
    # Without require_signed, unsigned is fine but a bad signature is still refused.
    with pytest.raises(ConfigError, match="not the trusted key"):
        PolicyStore(policy, _no_apply, public_key=keys / "secteam.pub")
    os.remove(f"{policy}.sig")
    store = PolicyStore(policy, _no_apply, public_key=keys / "secteam.pub")
    assert store.signature is None and store.active.signed_by is None


def test_the_store_keeps_the_last_good_policy_and_reports_every_attempt(
    tmp_path: Path, keys: Path
) -> None:
    policy = signed(tmp_path / "policy.yaml", keys)
    results: list[ReloadResult] = []
    store = _store(policy, keys, results)
    good = store.current
    assert store.signature is not None and store.signature.signer == "secteam"
    assert results[0].accepted and results[0].signed_by == "secteam" and results[0].why == "start"

    async def attempts() -> list[ReloadResult]:
        out = []
        policy.write_bytes(POLICY + b"\n# edited, not re-signed\n")  # tampered
        out.append(await store.reload("test"))
        os.remove(f"{policy}.sig")  # unsigned
        out.append(await store.reload("test"))
        policy.write_bytes(b"version: 1\npools: {}\n")  # broken
        out.append(await store.reload("test"))
        signed(policy, keys, POLICY + b"\n# re-signed\n")  # valid
        out.append(await store.reload("test"))
        return out

    tampered, unsigned, broken, valid = asyncio.run(attempts())
    assert "the policy changed after it was signed" in (tampered.error or "")
    assert "not signed: no signature file" in (unsigned.error or "")
    assert f"{policy}:2: pools: Dictionary should have at least 1 item" in (broken.error or "")
    assert not any(r.accepted or r.signed_by for r in (tampered, unsigned, broken))
    assert valid.accepted and valid.signed_by == "secteam" and valid.signed_at
    assert store.current is not good and store.current.version_hash == valid.version_hash
    assert store.last_refused == broken
    assert results[1:] == [tampered, unsigned, broken, valid]


def test_the_store_watches_the_signature_file_too(tmp_path: Path, keys: Path) -> None:
    policy = signed(tmp_path / "policy.yaml", keys)
    store = _store(policy, keys, [])

    async def deploy() -> None:
        watcher = asyncio.create_task(store.watch(interval=0.02))
        policy.write_bytes(POLICY + b"\n# v2\n")  # the policy first: refused for now
        for _ in range(200):
            await asyncio.sleep(0.02)
            if store.last_refused is not None:
                break
        key = load_signing_key(keys / "secteam.key")  # then its signature: accepted
        policy.with_name("policy.yaml.sig").write_bytes(sign_policy(policy.read_bytes(), key))
        for _ in range(200):
            await asyncio.sleep(0.02)
            if store.active.why == "file changed":
                break
        watcher.cancel()

    asyncio.run(deploy())
    assert store.last_refused is not None and store.active.accepted
    assert store.current.version_hash == store.signature.policy_sha256  # type: ignore[union-attr]


def test_an_older_signed_policy_is_refused_as_a_rollback(tmp_path: Path, keys: Path) -> None:
    key = load_signing_key(keys / "secteam.key")
    policy, sig = tmp_path / "policy.yaml", tmp_path / "policy.yaml.sig"
    old, new = POLICY + b"\n# v1\n", POLICY + b"\n# v2\n"
    now = time.time()
    old_sig = sign_policy(old, key, now=now - 3600)
    policy.write_bytes(new)
    sig.write_bytes(sign_policy(new, key, now=now))
    store = _store(policy, keys, [])

    async def deploy(data: bytes, envelope: bytes) -> ReloadResult:
        policy.write_bytes(data)
        sig.write_bytes(envelope)
        return await store.reload("test")

    rollback = asyncio.run(deploy(old, old_sig))  # validly signed, but an hour older
    assert not rollback.accepted
    assert "refused as a rollback; to go back to this policy on purpose, sign it again" in (
        rollback.error or ""
    )
    assert store.current.version_hash == hashlib.sha256(new).hexdigest()
    # The live policy with an older signature of the very same bytes is no rollback.
    assert asyncio.run(deploy(new, sign_policy(new, key, now=now - 7200))).accepted
    assert store.newest_signed is not None
    assert store.newest_signed.signed_at == pytest.approx(now, abs=1e-6)  # (microseconds)
    # Going back on purpose: the old file signed again is a new decision.
    assert asyncio.run(deploy(old, sign_policy(old, key, now=now + 1))).accepted
    # A store that starts after a newer signed policy was accepted (the router reads it
    # from its audit trail) refuses the older one at start.
    policy.write_bytes(new)
    sig.write_bytes(sign_policy(new, key, now=now - 60))
    with pytest.raises(ConfigError, match="refused as a rollback"):
        _store(policy, keys, [], newest_signed=store.newest_signed)


def test_another_policy_signed_in_the_same_second_is_refused_as_a_rollback(
    tmp_path: Path, keys: Path
) -> None:
    """Signing times have microseconds: an older policy signed a moment before the live
    one, within the same second, is still older. Whole-second signatures (as written
    before) are still read, and another policy signed in the very same second is no
    newer than the live one, so it is refused too."""
    key = load_signing_key(keys / "secteam.key")
    policy, sig = tmp_path / "policy.yaml", tmp_path / "policy.yaml.sig"
    old, new = POLICY + b"\n# v1\n", POLICY + b"\n# v2\n"
    second = float(int(time.time()) - 60)
    old_sig = sign_policy(old, key, now=second + 0.25)
    assert json.loads(old_sig)["signed_at"].endswith(".250000Z")
    policy.write_bytes(new)
    sig.write_bytes(sign_policy(new, key, now=second + 0.75))
    store = _store(policy, keys, [])

    async def deploy(data: bytes, envelope: bytes) -> ReloadResult:
        policy.write_bytes(data)
        sig.write_bytes(envelope)
        return await store.reload("test")

    rollback = asyncio.run(deploy(old, old_sig))
    assert not rollback.accepted and "refused as a rollback" in (rollback.error or "")
    assert ".250000Z, not after the newest signed policy" in (rollback.error or "")
    assert asyncio.run(deploy(new, sign_policy(new, key, now=second))).accepted  # same bytes
    whole = sign_policy(old, key, now=second)  # whole seconds: as signatures were written
    assert "." not in json.loads(whole)["signed_at"]
    assert not asyncio.run(deploy(old, sign_policy(old, key, now=second + 0.75))).accepted
    assert not asyncio.run(deploy(old, whole)).accepted
    assert asyncio.run(deploy(old, sign_policy(old, key, now=second + 0.76))).accepted


def test_a_signature_of_another_file_says_so(keys: Path) -> None:
    envelope = sign_policy(POLICY + b"# another\n", load_signing_key(keys / "secteam.key"))
    with pytest.raises(SignatureError, match="or this signature belongs to another file"):
        verify_policy_bytes(POLICY, envelope, load_trusted_key(keys / "secteam.pub"))


def test_a_signature_from_the_future_is_refused_and_never_becomes_the_floor(
    tmp_path: Path, keys: Path
) -> None:
    """Accepted, a signature dated tomorrow would be the rollback floor: every policy
    signed before tomorrow would then be refused. A few minutes of skew are fine."""
    key = load_signing_key(keys / "secteam.key")
    policy, sig = tmp_path / "policy.yaml", tmp_path / "policy.yaml.sig"
    v1, v2, v3 = (POLICY + f"\n# v{n}\n".encode() for n in (1, 2, 3))
    policy.write_bytes(v1)
    sig.write_bytes(sign_policy(v1, key, now=time.time() + 3600))
    results: list[ReloadResult] = []
    with pytest.raises(ConfigError, match=r"signed at \S+, 60 minutes ahead of this machine's"):
        _store(policy, keys, results)
    assert [(r.accepted, r.why) for r in results] == [(False, "start")]
    assert "sign the policy again" in (results[0].error or "")
    sig.write_bytes(sign_policy(v1, key, now=time.time() + 60))  # within the skew
    store = _store(policy, keys, results)

    async def deploy(data: bytes, envelope: bytes) -> ReloadResult:
        policy.write_bytes(data)
        sig.write_bytes(envelope)
        return await store.reload("test")

    future = asyncio.run(deploy(v2, sign_policy(v2, key, now=time.time() + 86400)))
    assert not future.accepted and "24.0 hours ahead" in (future.error or "")
    assert results[-1] == future and store.last_refused == future
    assert store.current.version_hash == hashlib.sha256(v1).hexdigest()
    assert store.newest_signed is not None and store.newest_signed.signed_at < time.time() + 300
    assert asyncio.run(deploy(v3, sign_policy(v3, key, now=time.time() + 120))).accepted


def test_a_future_floor_from_the_trail_is_pulled_back_to_now(tmp_path: Path, keys: Path) -> None:
    """A trail written before future signatures were refused may remember one: it must
    not refuse every policy for a year, nor let an older policy back in."""
    key = load_signing_key(keys / "secteam.key")
    policy, sig = tmp_path / "policy.yaml", tmp_path / "policy.yaml.sig"
    policy.write_bytes(POLICY)
    sig.write_bytes(sign_policy(POLICY, key, now=time.time() - 60))
    future = PolicySignature("secteam", key.key_id, time.time() + 365 * 86400, "ab" * 32)
    with pytest.raises(ConfigError, match="refused as a rollback"):
        _store(policy, keys, [], newest_signed=future)
    sig.write_bytes(sign_policy(POLICY, key, now=time.time() + 1))  # signed again
    store = _store(policy, keys, [], newest_signed=future)
    assert store.newest_signed is not None and store.newest_signed.signed_at < time.time() + 300


# --- a real router --------------------------------------------------------------------


class SignedRouter:
    """Two on-prem nodes, a cloud stand-in and a router requiring signed policies."""

    def __init__(self, root: Path, pki: Path, models: Path, keys: Path) -> None:
        os.environ["HYBRIDROUTE_CLOUD_TOKEN"] = "cloud-secret-token"
        self.loop, self.pki, self.keys = LoopThread(), pki, keys
        self.nodes = [self._node(models, "node", True) for _ in range(2)]
        self.cloud = self._node(models, "cloud", False)
        self.text = _policy_text([n.port for n in self.nodes], self.cloud.port).encode()
        self.policy = signed(root / "policy.yaml", keys, self.text)
        self.config = root / "router.yaml"
        self.config.write_text(f"""
listen: 127.0.0.1:0
tls: {{cert: {pki}/router.pem, key: {pki}/router.key, client_ca: {pki}/ca.pem}}
policy: {self.policy}
policy_public_key: {keys}/secteam.pub
require_signed_policy: true
upstream: {{ca: {pki}/ca.pem, cert: {pki}/router.pem, key: {pki}/router.key,
           cloud_ca: {pki}/ca.pem}}
admins: [admin]
watch_policy: false
""")
        self.router = RouterServer(load_config(self.config))
        self.results: list[ReloadResult] = []
        recorder = self.router.policies.on_result  # the router's own: it audits each result

        def both(result: ReloadResult) -> None:
            self.results.append(result)
            if recorder is not None:
                recorder(result)

        self.router.policies.on_result = both
        self.loop.run(self.router.start())
        self.address = f"localhost:{self.router.port}"

    def _node(self, models: Path, identity: str, onprem: bool) -> NodeServer:
        node = NodeServer(
            NodeOptions(
                models=models,
                listen="127.0.0.1:0",
                cert=self.pki / f"{identity}.pem",
                key=self.pki / f"{identity}.key",
                client_ca=self.pki / "ca.pem" if onprem else None,
                allow_clients=("router",) if onprem else (),
                bearer_token=None if onprem else "cloud-secret-token",
            )
        )
        self.loop.run(node.start())
        return node

    def admin(self) -> admin_pb2_grpc.RouterAdminStub:
        return admin_pb2_grpc.RouterAdminStub(mtls_channel(self.address, self.pki, "admin"))

    def reload(self) -> admin_pb2.ReloadPolicyResponse:
        return self.admin().ReloadPolicy(admin_pb2.ReloadPolicyRequest(), timeout=30)

    def zone_of_clean_public(self) -> str:
        stub = pb_grpc.GRPCInferenceServiceStub(mtls_channel(self.address, self.pki))
        _, call = stub.ModelInfer.with_call(
            ticket(CLEAN), metadata=[("x-data-classification", "public")], timeout=10
        )
        return str(dict(call.trailing_metadata())["x-hybridroute-zone"])

    def status(self, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
        pki = self.pki
        credentials = ["--ca", pki / "ca.pem", "--cert", pki / "app-admin.pem"]
        credentials += ["--key", pki / "app-admin.key"]
        code, out, _ = run(capsys, "status", "--router", self.address, *credentials, *extra)
        assert code == 0, out
        return out

    def close(self) -> None:
        self.loop.run(self.router.stop(grace=1))
        for node in [*self.nodes, self.cloud]:
            self.loop.run(node.stop(grace=1))
        self.loop.close()


@pytest.fixture(scope="module")
def router(
    tmp_path_factory: pytest.TempPathFactory, pki: Path, model_repo: Path, keys: Path
) -> Iterator[SignedRouter]:
    running = SignedRouter(tmp_path_factory.mktemp("signed-router"), pki, model_repo, keys)
    yield running
    running.close()


def test_status_shows_the_signer_of_the_live_policy(
    router: SignedRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    out = router.status(capsys)
    key_id = load_trusted_key(router.keys / "secteam.pub").key_id
    assert f"signed by     secteam (key {key_id[:16]}) at " in out
    data = json.loads(router.status(capsys, "--json"))["policy"]
    assert data["signed_by"] == f"secteam (key {key_id[:16]})" and data["signed_at"] > 0


def test_reloads_refuse_broken_unsigned_and_tampered_files_then_take_a_signed_one(
    router: SignedRouter, capsys: pytest.CaptureFixture[str]
) -> None:
    assert router.zone_of_clean_public() == "cloud"
    live = router.admin().Status(admin_pb2.StatusRequest(), timeout=5).policy.version_hash
    sig = router.policy.with_name("policy.yaml.sig")
    onprem_only = router.text.replace(b"route: cloud\n", b"route: onprem\n")
    try:
        router.policy.write_bytes(router.text.replace(b"default_route:", b"default_rout:"))
        broken = router.reload()
        assert not broken.accepted and "default_rout" in broken.error
        shutil.move(sig, f"{sig}.away")
        router.policy.write_bytes(onprem_only)
        unsigned = router.reload()
        assert not unsigned.accepted and "not signed: no signature file" in unsigned.error
        shutil.move(f"{sig}.away", sig)
        tampered = router.reload()  # the old signature, a changed policy
        assert not tampered.accepted and "changed after it was signed" in tampered.error
        assert router.zone_of_clean_public() == "cloud"  # the last good policy serves on
        out = router.status(capsys)
        assert f"version       {live[:12]}" in out and "changed after it was signed" in out
        signed(router.policy, router.keys, onprem_only)
        valid = router.reload()
        assert valid.accepted and valid.version_hash != live
        assert router.zone_of_clean_public() == "onprem"
        status = router.admin().Status(admin_pb2.StatusRequest(), timeout=5).policy
        assert status.version_hash == valid.version_hash and status.signed_by.startswith("secteam")
        assert [r.accepted for r in router.results[-4:]] == [False, False, False, True]
        assert router.results[-1].signed_by == "secteam"
        assert _audited(router.config.parent / "audit.db", "not signed: no signature file")
    finally:
        signed(router.policy, router.keys, router.text)
        assert router.reload().accepted


def _audited(db: Path, text: str) -> bool:
    """Whether a policy reload record mentioning `text` reached the audit trail."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT body FROM records WHERE kind = 'policy.reload'")
            if any(text in body for (body,) in rows):
                return True
        time.sleep(0.1)
    return False


def test_a_router_requiring_signatures_does_not_start_unsigned(
    router: SignedRouter, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(router.text)
    config = tmp_path / "router.yaml"
    config.write_text(
        router.config.read_text()
        .replace(str(router.policy), str(policy))
        .replace("127.0.0.1:0", f"127.0.0.1:{free_port()}")
    )
    done = subprocess.run(
        [*HYBRIDROUTE, "router", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "router not started" in done.stderr
    assert f"{policy}: policy refused: not signed: no signature file {policy}.sig" in done.stderr


def test_a_restarted_router_refuses_a_policy_older_than_its_trail_remembers(
    router: SignedRouter, tmp_path: Path
) -> None:
    """The floor survives a restart: it is read from the audit trail's policy records."""
    live = router.admin().Status(admin_pb2.StatusRequest(), timeout=5).policy
    older = tmp_path / "policy.yaml"
    older.write_bytes(router.text + b"\n# an older reviewed version\n")
    key = load_signing_key(router.keys / "secteam.key")
    envelope = sign_policy(older.read_bytes(), key, now=live.signed_at - 3600)
    older.with_name("policy.yaml.sig").write_bytes(envelope)
    config = router.config.with_name("restarted.yaml")  # same folder: the same audit.db
    config.write_text(router.config.read_text().replace(str(router.policy), str(older)))
    with pytest.raises(ConfigError, match="refused as a rollback") as info:
        RouterServer(load_config(config))
    assert live.version_hash[:12] in str(info.value)


def _accepted(signed_at: float, policy: str = "ab" * 32) -> ReloadResult:
    """A signed policy load as the router records it."""
    return ReloadResult(
        True,
        policy,
        None,
        time.time(),
        why="SIGHUP",
        path="p.yaml",
        signed_by="secteam",
        signed_at=signed_at,
        signing_key="cd" * 32,
    )


def _trail_of(root: Path, *loads: ReloadResult) -> AuditConfig:
    """A closed (sealed) audit trail in `root` holding these policy loads, in order."""
    cfg = AuditConfig.model_validate({"db": root / "audit.db"}).resolved(root)

    async def write() -> None:
        store = AuditStore(cfg)
        await store.start()
        for load in loads:
            await store.note(policy_note(load))
        await store.close()

    asyncio.run(write())
    return cfg


def test_pruning_the_trail_keeps_the_rollback_floor(tmp_path: Path) -> None:
    """`audit prune` removes the policy records the floor is read from; the newest signed
    one is kept aside, so a prune never re-opens the door to an older policy."""
    cfg = _trail_of(tmp_path, _accepted(time.time() - 60))
    floor = newest_signed_policy(cfg.db)
    assert floor is not None and floor.policy_sha256 == "ab" * 32
    assert cfg.signing_key is not None
    key = load_verify_key(cfg.signing_key.with_suffix(".pub"))
    with contextlib.closing(connect_writer(cfg.db, 5)) as conn:
        assert prune(conn, key, time.time_ns() // 1000).removed > 0
        left = conn.execute("SELECT COUNT(*) FROM records WHERE kind = 'policy.reload'")
        assert left.fetchone()[0] == 0
    assert newest_signed_policy(cfg.db) == floor


def test_the_floor_is_the_newest_signature_not_the_last_one_accepted(tmp_path: Path) -> None:
    """A router accepts an older signature of its live policy (the same bytes); written
    after the newer one, it must not become the floor the next start reads."""
    now = time.time()
    # B re-signed (the floor), then B's old signature put back.
    cfg = _trail_of(tmp_path, _accepted(now - 60), _accepted(now - 7200))
    floor = newest_signed_policy(cfg.db)
    assert floor is not None and floor.signed_at == pytest.approx(now - 60, abs=1e-3)
