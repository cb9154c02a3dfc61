"""`hybridroute models deploy`: put a version on every node of a pool and load it there.

Steps, reported per node:

1. The version: a packaged version directory (checked here with the node's own
   loader, so a bad artifact fails before any node sees it), or an estimator and its
   sample data, packaged on the fly (the `models package` flags).
2. Copy it into each node's repository, `REPO/<name>/<version>`. The repository is
   `--repository DIR` if given, else the directory the node reports (NodeAdmin.Info).
   Nodes sharing a repository (the on-prem nodes of `hybridroute up` share
   `state_dir/models`; its cloud stand-in has its own, which no deploy reaches) get one
   copy; a directory already holding identical files is left alone; different
   files are replaced only with `--force`. Copies are written under a hidden name and
   renamed, so a node never loads half a version. Nodes whose repository is not
   reachable from here (another host, no shared mount) are reported, not guessed at:
   no RPC uploads files, because an admin able to place files is an admin able to
   choose what a node unpickles.
3. RepositoryModelLoad of that version on each node (see `node/lifecycle.py`).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from hybridroute.cli import UsageError
from hybridroute.node.admin_client import (
    Credentials,
    NodeTarget,
    add_target_arguments,
    call,
    node_channel,
    print_table,
    resolve_targets,
)
from hybridroute.node.models_cli import load_on, versions_now
from hybridroute.node.package_cli import add_package_arguments

__all__ = ["DeployError", "DeployResult", "place_version", "register_deploy"]


class DeployError(Exception):
    """A version cannot be placed in a repository; the message says why."""


@dataclass(frozen=True)
class DeployResult:
    """What happened on one node."""

    node: str
    address: str
    model: str
    version: int
    repository: str
    copy: str  # copied, replaced, already there, in place, shared with NODE, failed
    ok: bool
    code: str
    message: str
    versions: str


def register_deploy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `hybridroute models deploy`."""
    p = sub.add_parser(
        "deploy",
        help="copy a model version to every node of a pool and load it there",
        description="Deploy a packaged version directory (REPO/NAME/VERSION), or package "
        "--estimator on the fly, to the on-prem nodes of --to POOL (with --stack) or to "
        "--node ADDR ...: copy it into each node's repository and load it. Reports per node.",
    )
    p.add_argument("source", nargs="?", type=Path, metavar="DIR", help="packaged version dir")
    p.add_argument("--to", metavar="POOL", help="pool of the stack to deploy to")
    p.add_argument(
        "--repository",
        type=Path,
        metavar="DIR",
        help="the nodes' repository as seen from here (default: what each node reports)",
    )
    p.add_argument("--force", action="store_true", help="replace a different version on disk")
    add_target_arguments(p)
    group = p.add_argument_group("packaging on the fly (instead of DIR)")
    add_package_arguments(group, deploy=True)
    p.set_defaults(handler=_models_deploy)


# -------------------------------------------------------------------- placement


def _same_files(a: Path, b: Path) -> bool:
    """Whether two directories hold the same files with the same bytes."""
    listed = [sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file()) for d in (a, b)]
    if listed[0] != listed[1]:
        return False
    return all(filecmp.cmp(a / rel, b / rel, shallow=False) for rel in listed[0])


def place_version(source: Path, repo: Path, name: str, version: int, *, force: bool) -> str:
    """Put `source` at `repo/name/version`; returns what was done (see DeployResult.copy)."""
    from hybridroute.node.packaging import publish_version

    if not repo.is_dir():
        raise DeployError(
            f"repository {repo} is not a directory here: copy {name}/{version} to the node "
            "yourself (or pass --repository), then run 'hybridroute models load'"
        )
    final = repo / name / str(version)
    if final.exists() and final.resolve() == source.resolve():
        return "in place"
    if final.exists() and _same_files(source, final):
        return "already there"
    if final.exists() and not force:
        raise DeployError(f"{final} exists with different files (--force replaces it)")
    replaced = final.exists()
    (repo / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.deploy.", dir=repo / name))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        publish_version(staging, final, force=force)
    except OSError as exc:
        raise DeployError(f"cannot write {final}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return "replaced" if replaced else "copied"


# ---------------------------------------------------------------------- source


@contextmanager
def _source(args: argparse.Namespace) -> Iterator[tuple[Path, str, int]]:
    """The version directory to deploy and its model name and version."""
    from hybridroute.node.loading import ModelLoadError, load_version
    from hybridroute.node.package_cli import package_from_args

    with tempfile.TemporaryDirectory(prefix="hybridroute-deploy-") as scratch:
        if args.source is not None:
            if args.estimator is not None:
                raise UsageError("give a version directory or --estimator, not both")
            path = args.source
        elif args.estimator is not None:
            missing = [f for f in ("name", "version", "sample_data") if getattr(args, f) is None]
            if missing:
                flags = ", ".join("--" + m.replace("_", "-") for m in missing)
                raise UsageError(f"packaging --estimator needs {flags}")
            path = package_from_args(args, Path(scratch), force=False)
        else:
            raise UsageError("give a packaged version directory, or --estimator to package one")
        try:
            model = load_version(path, check_location=False)
        except ModelLoadError as exc:
            raise UsageError(f"{path} does not load, nothing was deployed: {exc}") from None
        yield path, model.name, model.version


# ---------------------------------------------------------------------- command


def _node_repository(target: NodeTarget, creds: Credentials, timeout: float) -> Path:
    from hybridroute.protos import node_admin_pb2 as pb
    from hybridroute.protos import node_admin_pb2_grpc as pb_grpc

    with node_channel(target, creds) as channel:
        info = pb_grpc.NodeAdminStub(channel).Info(pb.InfoRequest(), timeout=timeout)
    return Path(info.repository)


def _pool_targets(args: argparse.Namespace) -> tuple[list[NodeTarget], Credentials]:
    targets, creds = resolve_targets(args)
    if args.stack is not None:
        pools = ", ".join(sorted({t.pool for t in targets}))
        if not args.to:
            raise UsageError(f"--to POOL: which pool of the stack? ({pools})")
        chosen = [t for t in targets if t.pool == args.to]
        if not chosen:
            raise UsageError(f"--to {args.to}: no on-prem node in that pool (pools: {pools})")
        return chosen, creds
    if args.to:
        raise UsageError("--to POOL needs --stack; with --node, list the pool's nodes")
    return targets, creds


def _deploy_one(
    args: argparse.Namespace,
    target: NodeTarget,
    creds: Credentials,
    version: tuple[Path, str, int],
    placed: dict[Path, str],
) -> DeployResult:
    source, name, number = version

    def result(repo: object, copy: str, code: str, message: str, versions: str) -> DeployResult:
        return DeployResult(
            target.name,
            target.address,
            name,
            number,
            str(repo or ""),
            copy,
            code == "OK",
            code,
            message,
            versions,
        )

    repo: Path | None = args.repository
    if repo is None:
        repo, code, message = call(lambda: _node_repository(target, creds, args.timeout))
        if repo is None:
            return result("", "failed", code, message, "?")
    key = repo.resolve()
    if key in placed:
        copy = f"shared with {placed[key]}"
    else:
        try:
            copy = place_version(source, repo, name, number, force=args.force)
        except DeployError as exc:
            return result(repo, "failed", "NOT_COPIED", str(exc), "?")
        placed[key] = target.name
    _, code, message = call(lambda: load_on(target, creds, name, number, args.timeout))
    return result(repo, copy, code, message, versions_now(target, creds, name, args.timeout))


def _models_deploy(args: argparse.Namespace) -> int:
    targets, creds = _pool_targets(args)
    with _source(args) as version:
        placed: dict[Path, str] = {}
        results = [_deploy_one(args, t, creds, version, placed) for t in targets]
    if args.json:
        for r in results:
            print(json.dumps(asdict(r)))
    else:
        _, name, number = version
        print(f"deploying {name} version {number} to {len(results)} node(s)")
        print_table(
            ("NODE", "COPY", "LOAD", "VERSIONS NOW", "DETAIL"),
            [(r.node, r.copy, r.code, r.versions, r.message) for r in results],
        )
    return 0 if all(r.ok for r in results) else 1
