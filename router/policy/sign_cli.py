"""Handlers of `hybridroute policy keygen | sign | verify` (parsers in `policy.cli`).

`sign` compiles the policy first and refuses to sign one with errors: a signature
says "reviewed and approved", and a router would refuse that file anyway. Exit codes
are `policy.cli`'s: 1 when the answer is no (invalid policy, signature does not
verify or is dated in the future), 2 when the command cannot run (unreadable key,
existing key files).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hybridroute.cli import UsageError
from hybridroute.config import load_yaml
from hybridroute.router.policy.checks import Problem, find_environment_warnings
from hybridroute.router.policy.cli import EXIT_FAILED, EXIT_OK, load_policy_or_report
from hybridroute.router.policy.signing import (
    KeyFileError,
    SignatureError,
    check_not_future,
    generate_keypair,
    load_signing_key,
    load_trusted_key,
    sign_policy,
    signature_path,
    verify_policy_file,
    write_signature,
)

if TYPE_CHECKING:
    from hybridroute.router.policy.schema import Policy

__all__ = ["run_keygen", "run_sign", "run_verify"]


def run_keygen(args: argparse.Namespace) -> int:
    try:
        key, pub = generate_keypair(args.out, args.signer, force=args.force)
    except (ValueError, FileExistsError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write keys to {args.out}: {exc.strerror or exc}") from None
    print(f"private key  {key}  (0600: keep it with the security team, never on routers)")
    print(f"public key   {pub}")
    print(f"key id       {load_trusted_key(pub).key_id}")
    print("router config:")
    print(f"  policy_public_key: {pub.resolve()}")
    print("  require_signed_policy: true")
    return EXIT_OK


def _warn_if_readable(path: os.PathLike[str]) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        print(
            f"warning: {path} is readable by other users (mode {mode & 0o777:o}); "
            "a signing key should be 0600",
            file=sys.stderr,
        )


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file (through links, `..` or a hard link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where they would be
        return a.resolve() == b.resolve()


def _check_out(args: argparse.Namespace) -> None:
    """The signature replaces whatever --out names: never the policy or the key."""
    out = args.out or signature_path(args.policy)
    for what, path in (("the policy", args.policy), ("the signing key", args.key)):
        if _same_file(out, path):
            raise UsageError(
                f"--out {out} is {what} ({path}): writing the signature there would "
                f"replace it; drop --out (the default is {signature_path(args.policy)}) "
                "or name another file"
            )


def run_sign(args: argparse.Namespace) -> int:
    _check_out(args)
    try:
        key = load_signing_key(args.key)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    _warn_if_readable(args.key)
    try:
        data = args.policy.read_bytes()
        envelope = sign_policy(data, key, signer=args.signer)
    except OSError as exc:
        raise UsageError(f"cannot read {args.policy}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    policy = load_policy_or_report(args.policy)
    if policy is None:
        print("not signed: fix the errors first", file=sys.stderr)
        return EXIT_FAILED
    if policy.version_hash != hashlib.sha256(data).hexdigest():
        print(f"not signed: {args.policy} changed while it was being signed", file=sys.stderr)
        return EXIT_FAILED
    out = write_signature(args.policy, envelope, args.out)
    warned = f"; {len(policy.warnings)} warning(s), see 'policy check'" if policy.warnings else ""
    print(f"signed {args.policy} (sha256 {policy.version_hash[:12]}{warned})")
    print(f"  signer {args.signer or key.signer}, key {key.key_id[:16]}")
    print(f"  signature written to {out}")
    for line, where, message in _environment_warnings(args.policy, data, policy):
        loc = f"{args.policy}:{line}" if line else str(args.policy)
        print(f"{loc}: {where}: warning: {message}", file=sys.stderr)
    return EXIT_OK


def _environment_warnings(path: Path, data: bytes, policy: Policy) -> list[Problem]:
    """What this machine's environment lacks for the policy (an unset bearer token
    variable): worth saying at signing time, though the router's may differ. `data`
    compiled, so it is UTF-8 and parses; this only finds the lines again."""
    located = load_yaml(path, text=data.decode("utf-8"))
    return find_environment_warnings(policy.pools, located)


def run_verify(args: argparse.Namespace) -> int:
    try:
        trusted = load_trusted_key(args.key)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    sig = args.signature or signature_path(args.policy)
    try:
        found = verify_policy_file(args.policy, trusted, args.signature)
        check_not_future(found, time.time())
    except SignatureError as exc:
        print(f"{args.policy}: NOT VERIFIED: {exc}")
        return EXIT_FAILED
    age = max(0.0, time.time() - found.signed_at) / 86400
    print(f"{args.policy}: verified ({sig})")
    print(f"  sha256     {found.policy_sha256}")
    print(f"  signed by  {found.signer} (key {found.key_id[:16]})")
    print(f"  signed at  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(found.signed_at))}"
          f" ({age:.1f} days ago)")  # fmt: skip
    return EXIT_OK
