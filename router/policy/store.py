"""The live policy: loaded at start, reloaded on SIGHUP or when the file changes.

Reload is atomic: a request takes `store.current` once and is decided by that object
to the end, so in-flight requests finish under the policy they started with. A new
policy that fails to compile or to verify is refused: the last good one keeps
serving, and the refusal is logged, kept in `last_refused` (shown by `hybridroute
status`) and handed to `on_result` (which the audit trail records).

Signatures (see `signing`): with a trusted public key, a policy that has a signature
file (`POLICY.sig`) is accepted only if it verifies, and the signer is reported; with
`require_signed=True` an unsigned policy is refused too, at start (the router does not
start) and at reload. The signature is checked against the hash of the very bytes
that were compiled, so a file replaced between the two reads cannot slip through.
Without a trusted key, signature files are ignored (and nothing is reported signed).

Rollback: a signed policy signed *no later than* the newest signed policy this router
has accepted is refused, unless it is that same policy (signing times have
microseconds, so "the same second" is no loophole; older signatures have whole
seconds, and another policy signed in the same one is refused too). Otherwise anyone
able to write the policy file could put back an older, validly signed policy (one
that, say, still sent a now-restricted model to the cloud) without the signing key,
as TUF's rollback attack does. The newest is the live policy, or across restarts the
last accepted one that the audit trail recorded (`newest_signed`, given by the
router). Going back on purpose is a new decision: sign the old file again.

A signature dated in the future (beyond `signing.CLOCK_SKEW`, from a signing machine
whose clock is wrong) is refused: accepted, it would become that floor and refuse
every policy signed before its date.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hybridroute.config import ConfigError
from hybridroute.filestamp import Stamp, stamp
from hybridroute.router.policy.schema import Policy, compile_policy
from hybridroute.router.policy.signing import (
    CLOCK_SKEW,
    KeyFileError,
    PolicySignature,
    SignatureError,
    TrustedKey,
    check_not_future,
    load_trusted_key,
    rfc3339,
    signature_path,
    verify_envelope,
)

if TYPE_CHECKING:
    from hybridroute.router.config import RouterConfig

__all__ = ["OnResult", "PolicyStore", "ReloadResult"]

log = logging.getLogger(__name__)

Apply = Callable[[Policy], Awaitable[None]]


@dataclass(frozen=True)
class ReloadResult:
    """One attempt to load the policy (the first load included), accepted or refused.

    `version_hash` is set only when accepted (it is then the live policy); the signer
    fields only when the accepted policy's signature verified against the trusted key.
    """

    accepted: bool
    version_hash: str | None
    error: str | None
    at: float
    why: str = ""  # "start", "SIGHUP", "file changed", "admin API"
    path: str = ""
    signed_by: str | None = None
    signed_at: float | None = None  # unix seconds, from the signature
    signing_key: str | None = None  # hex SHA-256 of the public key


OnResult = Callable[[ReloadResult], None]


class PolicyStore:
    """Holds the live `Policy`; `reload()` swaps in a new one only if it is acceptable.

    Raises `ConfigError` from the constructor when the first policy is refused (an
    unreadable trusted key included): a router must not start without a good policy.
    `on_result` is called for that first load and for every later attempt.
    """

    def __init__(
        self,
        path: Path,
        apply: Apply,
        *,
        public_key: Path | None = None,
        require_signed: bool = False,
        newest_signed: PolicySignature | None = None,
        on_result: OnResult | None = None,
    ) -> None:
        self.path = path
        self.require_signed = require_signed
        # updated as signed policies are accepted
        self.newest_signed = _sane_floor(newest_signed, time.time())
        self.on_result = on_result
        self._apply = apply
        self._lock = asyncio.Lock()
        self.last_refused: ReloadResult | None = None
        self.history: list[ReloadResult] = []
        self._trusted: TrustedKey | None = None
        self._stamp = self._stamps()
        try:
            self._trusted = self._trusted_key(public_key, require_signed)
            policy, signature = self._load()
        except (ConfigError, SignatureError) as exc:
            self._record(self._refused(exc, "start"))
            raise _as_config_error(path, exc) from None
        self.current: Policy = policy
        self.loaded_at = time.time()
        self.active = self._accepted(policy, signature, "start", self.loaded_at)
        self._newest(signature)
        self._record(self.active)
        for warning in policy.warnings:
            log.warning("policy: %s", warning)

    @classmethod
    def for_config(
        cls,
        config: RouterConfig,
        apply: Apply,
        *,
        newest_signed: PolicySignature | None = None,
        on_result: OnResult | None = None,
    ) -> PolicyStore:
        """The store a router with `config` needs (policy path and signing settings)."""
        return cls(
            config.policy,
            apply,
            public_key=config.policy_public_key,
            require_signed=config.require_signed_policy,
            newest_signed=newest_signed,
            on_result=on_result,
        )

    @staticmethod
    def _trusted_key(public_key: Path | None, require_signed: bool) -> TrustedKey | None:
        if require_signed and public_key is None:
            raise ConfigError(
                "router config", [(None, "require_signed_policy", "needs policy_public_key")]
            )
        if public_key is None:
            return None
        try:
            return load_trusted_key(public_key)
        except KeyFileError as exc:
            raise ConfigError(str(public_key), [(None, "policy_public_key", str(exc))]) from None

    @property
    def signature(self) -> PolicySignature | None:
        """The verified signature of the live policy, or None when it is not signed."""
        r = self.active
        if r.signed_by is None or r.signed_at is None or r.signing_key is None:
            return None
        return PolicySignature(r.signed_by, r.signing_key, r.signed_at, r.version_hash or "")

    async def start(self) -> None:
        await self._apply(self.current)

    async def reload(self, why: str) -> ReloadResult:
        """Try the file as it is now; keep the current policy if it is not acceptable."""
        async with self._lock:
            # Taken before the file is read: a change while it is read is seen again.
            previous, self._stamp = self._stamp, self._stamps()
            try:
                policy, signature = await asyncio.to_thread(self._load)
                await self._apply(policy)
            except asyncio.CancelledError:
                # Called off before the policy took effect (an admin caller gone, the
                # router stopping): the file is not handled, so the watcher retries it.
                self._stamp = previous
                raise
            except (ConfigError, SignatureError, OSError, ValueError) as exc:
                result = self._refused(exc, why)
                log.error(
                    "policy reload (%s) refused; still serving %s:\n%s",
                    why,
                    self.current.version_hash[:12],
                    result.error,
                )
            else:
                loaded_at = time.time()
                result = self._accepted(policy, signature, why, loaded_at)
                self.current, self.loaded_at, self.active = policy, loaded_at, result
                self._newest(signature)
                log.info("policy reloaded (%s): %s%s", why, policy.version_hash[:12], _by(result))
                for warning in policy.warnings:
                    log.warning("policy: %s", warning)
            self._record(result)
            return result

    async def watch(self, interval: float = 1.0, settle: float = 0.5) -> None:
        """Reload whenever the policy file or its signature file changes (identity,
        size, mtime or ctime): a signature deployed after its policy is picked up too,
        and so is a file refused as unreadable once chmod or chown fixes it.

        A file rewritten in place is read only once it has stopped changing for
        `settle` seconds: half a policy can be a valid policy (one that stops before
        its deny rules). A replacement by rename (editors, configmap symlink swaps) is
        whole at once and only waits `settle`. Whatever one attempt raises, the
        watcher goes on."""
        while True:
            await asyncio.sleep(interval)
            try:
                if self._stamps() == self._stamp:
                    continue
                await self._settled(settle)
                if self._stamps() != self._stamp:  # not taken by another reload meanwhile
                    await self.reload("file changed")
            except Exception as exc:  # the watcher must not die of one file
                log.error("policy watcher: reload failed (%s); still watching", type(exc).__name__)

    async def _settled(self, settle: float) -> None:
        """Return once the files' stamps stayed the same for `settle` seconds."""
        seen = self._stamps()
        while True:
            await asyncio.sleep(settle)
            now = self._stamps()
            if now == seen:
                return
            seen = now

    # ------------------------------------------------------------------ internals

    def _stamps(self) -> tuple[Stamp, Stamp]:
        return stamp(self.path), stamp(signature_path(self.path))

    def _load(self) -> tuple[Policy, PolicySignature | None]:
        """Compile, then verify the signature against the hash of the compiled bytes."""
        policy = compile_policy(self.path)  # every YAML error is a ConfigError there
        return policy, self._verify(policy)

    def _verify(self, policy: Policy) -> PolicySignature | None:
        if self._trusted is None:
            return None
        sig_path = signature_path(self.path)
        try:
            envelope = sig_path.read_bytes()
        except FileNotFoundError:
            if self.require_signed:
                raise SignatureError(
                    f"not signed: no signature file {sig_path}, and this router requires "
                    "a signed policy (require_signed_policy)"
                ) from None
            return None
        except OSError as exc:
            raise SignatureError(f"cannot read {sig_path}: {exc.strerror or exc}") from None
        try:
            signature = verify_envelope(envelope, self._trusted, policy.version_hash)
            check_not_future(signature, time.time())
        except SignatureError as exc:
            raise SignatureError(f"signature {sig_path} refused: {exc}") from None
        newest = self.newest_signed
        if (
            newest is not None
            and signature.signed_at <= newest.signed_at
            and signature.policy_sha256 != newest.policy_sha256
        ):  # (not later: another policy signed in the same instant is no newer)
            raise SignatureError(
                f"signed at {rfc3339(signature.signed_at)}, not after the newest signed policy "
                f"this router accepted ({newest.policy_sha256[:12]}, signed at "
                f"{rfc3339(newest.signed_at)}): refused as a rollback; to go back to this "
                "policy on purpose, sign it again"
            )
        return signature

    def _newest(self, signature: PolicySignature | None) -> None:
        newest = self.newest_signed
        if signature is not None and (newest is None or signature.signed_at >= newest.signed_at):
            self.newest_signed = signature

    def _accepted(
        self, policy: Policy, signature: PolicySignature | None, why: str, at: float
    ) -> ReloadResult:
        return ReloadResult(
            True,
            policy.version_hash,
            None,
            at,
            why=why,
            path=str(self.path),
            signed_by=signature.signer if signature else None,
            signed_at=signature.signed_at if signature else None,
            signing_key=signature.key_id if signature else None,
        )

    def _refused(self, exc: Exception, why: str) -> ReloadResult:
        error = str(exc) if not isinstance(exc, SignatureError) else f"{self.path}: {exc}"
        result = ReloadResult(False, None, error, time.time(), why=why, path=str(self.path))
        self.last_refused = result
        return result

    def _record(self, result: ReloadResult) -> None:
        self.history.append(result)
        del self.history[:-20]
        if self.on_result is None:
            return
        try:
            self.on_result(result)
        except Exception:  # a failing hook must not leave the store half-updated
            log.exception("policy store: on_result hook failed for %s", result)


def _sane_floor(newest: PolicySignature | None, now: float) -> PolicySignature | None:
    """The rollback floor the trail remembers, pulled back to `now` if it lies in the
    future: a trail written before such signatures were refused may hold one, and it
    would refuse every policy signed until then. Pulled back, not dropped, so a policy
    signed before this start is still refused as a rollback (unless it is that one)."""
    if newest is None or newest.signed_at <= now + CLOCK_SKEW:
        return newest
    log.warning(
        "the newest signed policy the audit trail remembers (%s) is signed at %s, in the "
        "future; policies signed before now (%s) count as rollbacks instead",
        newest.policy_sha256[:12],
        rfc3339(newest.signed_at),
        rfc3339(now),
    )
    return replace(newest, signed_at=now)


def _by(result: ReloadResult) -> str:
    return f", signed by {result.signed_by}" if result.signed_by else ""


def _as_config_error(path: Path, exc: ConfigError | SignatureError) -> ConfigError:
    if isinstance(exc, ConfigError):
        return exc
    return ConfigError(str(path), [(None, "", f"policy refused: {exc}")])
