"""`hybridroute models list|load|unload`: a node's versions, changed while it serves.

Each command talks to every target node (see `node/admin_client.py`) and reports per
node; the exit code is 1 when any node failed, so a script notices a partial rollout.
The targets of `--stack` are its on-prem nodes: `list` says which cloud stand-ins it
left out and why, so their absence does not read as "serves no model".
`models deploy` (copy and load a version on a pool) lives in `node/deploy.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

from hybridroute.node.admin_client import (
    Credentials,
    NodeTarget,
    add_target_arguments,
    call,
    node_channel,
    print_table,
    resolve_targets,
)

__all__ = ["IndexLine", "load_on", "read_index", "register_lifecycle_commands", "versions_now"]


@dataclass(frozen=True)
class IndexLine:
    """One RepositoryIndex row of one node."""

    node: str
    address: str
    model: str
    version: str
    state: str
    reason: str


def register_lifecycle_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `list`, `load` and `unload` under `hybridroute models`."""
    p = sub.add_parser(
        "list",
        help="list model versions on nodes: READY, failed (with why) or not loaded",
        description="RepositoryIndex of every target node.",
    )
    p.add_argument("--model", metavar="NAME", help="only this model")
    add_target_arguments(p)
    p.set_defaults(handler=_models_list)

    p = sub.add_parser(
        "load",
        help="load a model version on nodes while they serve",
        description="Load VERSION of MODEL from each node's repository (without --version: "
        "what the model's version policy selects). New requests get the new version; "
        "requests in flight finish on the old one; a version that fails to load changes "
        "nothing that serves and the reason is printed.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--version", type=int, metavar="N", help="version number to load")
    add_target_arguments(p)
    p.set_defaults(handler=_models_load)

    p = sub.add_parser(
        "unload",
        help="unload a model version on nodes",
        description="Unload VERSION of MODEL (without --version: every version). Refused "
        "when it would leave the model without a READY version, unless --force.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--version", type=int, metavar="N", help="version number to unload")
    p.add_argument("--force", action="store_true", help="allow unloading the last READY version")
    add_target_arguments(p)
    p.set_defaults(handler=_models_unload)


# ------------------------------------------------------------------------- calls


def read_index(target: NodeTarget, creds: Credentials, timeout: float) -> list[IndexLine]:
    """RepositoryIndex of one node (raises grpc.RpcError)."""
    from hybridroute.protos import inference_pb2 as pb
    from hybridroute.protos import inference_pb2_grpc as pb_grpc

    with node_channel(target, creds) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=timeout)
    return [
        IndexLine(target.name, target.address, m.name, m.version, m.state, m.reason)
        for m in reply.models
    ]


def load_on(
    target: NodeTarget, creds: Credentials, model: str, version: int | None, timeout: float
) -> None:
    """RepositoryModelLoad on one node (raises grpc.RpcError)."""
    from hybridroute.protos import inference_pb2 as pb
    from hybridroute.protos import inference_pb2_grpc as pb_grpc

    request = pb.RepositoryModelLoadRequest(model_name=model)
    if version is not None:
        request.parameters["version"].int64_param = version
    with node_channel(target, creds) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(request, timeout=timeout)


def _unload_on(
    target: NodeTarget,
    creds: Credentials,
    model: str,
    version: int | None,
    force: bool,
    timeout: float,
) -> None:
    from hybridroute.protos import inference_pb2 as pb
    from hybridroute.protos import inference_pb2_grpc as pb_grpc

    request = pb.RepositoryModelUnloadRequest(model_name=model)
    if version is not None:
        request.parameters["version"].int64_param = version
    if force:
        request.parameters["force"].bool_param = True
    with node_channel(target, creds) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(request, timeout=timeout)


# ---------------------------------------------------------------------- commands


def _models_list(args: argparse.Namespace) -> int:
    targets, creds = resolve_targets(args)
    lines: list[IndexLine] = []
    failed = 0
    for target in targets:
        found, code, message = call(partial(read_index, target, creds, args.timeout))
        if found is None:
            failed += 1
            lines.append(IndexLine(target.name, target.address, "", "", code, message))
            continue
        lines += [line for line in found if not args.model or line.model == args.model]
    _print_index(lines, as_json=args.json)
    for note in _not_listed(args):  # on stderr under --json: stdout stays one object a line
        print(note, file=sys.stderr if args.json else sys.stdout)
    return 1 if failed else 0


def _not_listed(args: argparse.Namespace) -> list[str]:
    """Why the stack's cloud stand-ins are not in the list: they are no admin target."""
    if args.stack is None or args.node:
        return []
    try:
        nodes = json.loads(args.stack.read_text())["nodes"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # resolve_targets read it a moment ago; nothing to add
    notes = []
    for node in nodes:
        if not isinstance(node, dict) or node.get("zone") == "onprem":
            continue
        repo = node.get("repository")
        serves = f"; it serves {repo}, which no deploy changes" if repo else ""
        notes.append(
            f"not listed: {node.get('name')} ({node.get('address')}, zone "
            f"{node.get('zone')}), the cloud stand-in: like a cloud endpoint it takes "
            f"only the router's bearer token, no admin calls{serves}"
        )
    return notes


def _print_index(lines: Sequence[IndexLine], *, as_json: bool) -> None:
    if as_json:
        for line in lines:
            print(json.dumps(asdict(line)))
        return
    rows = [(ln.node, ln.model or "-", ln.version or "-", ln.state, ln.reason) for ln in lines]
    print_table(("NODE", "MODEL", "VERSION", "STATE", "REASON"), rows)


def versions_now(target: NodeTarget, creds: Credentials, model: str, timeout: float) -> str:
    """`2 READY, 1 READY`: the versions of `model` on one node, for the output line after
    a change (best effort: "?" when the node does not answer, "" when it has none)."""
    found, _, _ = call(lambda: read_index(target, creds, timeout))
    if found is None:
        return "?"
    return ", ".join(f"{ln.version} {ln.state}" for ln in reversed(found) if ln.model == model)


def _report(
    args: argparse.Namespace,
    targets: Sequence[NodeTarget],
    creds: Credentials,
    action: str,
    outcomes: Sequence[tuple[str, str]],
) -> int:
    failed = 0
    rows = []
    for target, (code, message) in zip(targets, outcomes, strict=True):
        versions = versions_now(target, creds, args.model, args.timeout) or "none"
        failed += code != "OK"
        record = {
            "node": target.name,
            "address": target.address,
            "model": args.model,
            "version": args.version,
            "action": action,
            "ok": code == "OK",
            "code": code,
            "message": message,
            "versions": versions,
        }
        rows.append(record)
    if args.json:
        for record in rows:
            print(json.dumps(record))
    else:
        print_table(
            ("NODE", "RESULT", "VERSIONS NOW", "DETAIL"),
            [(r["node"], r["code"], r["versions"], r["message"]) for r in rows],
        )
    return 1 if failed else 0


def _on_each_node(
    args: argparse.Namespace, action: str, change: Callable[[NodeTarget, Credentials], None]
) -> int:
    """`change` on every target node in turn, then the report of what each did."""
    targets, creds = resolve_targets(args)
    outcomes = []
    for target in targets:
        _, code, message = call(partial(change, target, creds))
        outcomes.append((code, message))
    return _report(args, targets, creds, action, outcomes)


def _models_load(args: argparse.Namespace) -> int:
    return _on_each_node(
        args, "load", lambda t, c: load_on(t, c, args.model, args.version, args.timeout)
    )


def _models_unload(args: argparse.Namespace) -> int:
    return _on_each_node(
        args,
        "unload",
        lambda t, c: _unload_on(t, c, args.model, args.version, args.force, args.timeout),
    )
