"""`hybridroute policy ...`: what a security team runs before a policy goes live.

    check FILE...                       errors and warnings with file:line, like a compiler
    test FILE CASES...                  run test cases offline; coverage of rules
    explain FILE --request REQ          every rule's outcome and why, for one request
    diff OLD NEW [--cases CASES...]     rules and settings changed; cases whose outcome moves
    replay NEW --db AUDIT [--since T]   re-decide recorded traffic under NEW
    keygen --out DIR --signer NAME      an Ed25519 policy signing keypair
    sign FILE --key KEY                 a detached signature, FILE.sig
    verify FILE --key PUB               check FILE.sig against a trusted public key

Exit codes, the same for every subcommand, so CI can gate on them:

- 0: success (the policy is valid, every case passed, the signature verifies, ...);
- 1: the answer is "no": an error in a policy or cases file, a failed case, coverage
  under `--fail-under`, a signature that does not verify, and the opt-in gates
  (`check --strict` on warnings, `diff --exit-code` on changed outcomes, `replay
  --fail-on-cloud` when traffic would newly go to the cloud);
- 2: the command could not run: bad arguments, a policy, cases or request file that
  is not there, an unreadable key or audit database.

The handlers only parse, call and print; the work is in `policy.lint`,
`policy.testing`, `policy.render`, `policy.diff`, `policy.replay` and `signing`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hybridroute.cli import UsageError

if TYPE_CHECKING:
    from typing import TypeAlias

    from hybridroute.router.policy.lint import CheckReport
    from hybridroute.router.policy.schema import Policy
    from hybridroute.router.policy.testing import Coverage

    Sub: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["EXIT_FAILED", "EXIT_OK", "load_policy_or_report", "register", "require_files"]

EXIT_OK, EXIT_FAILED = 0, 1

Handler = Callable[[argparse.Namespace], int]


def _lazy(module: str, name: str) -> Handler:
    """A handler that imports its module only when run: every `hybridroute` command
    builds this parser, and the policy machinery takes a noticeable time to import."""

    def handler(args: argparse.Namespace) -> int:
        run: Handler = getattr(importlib.import_module(module), name)
        return run(args)

    return handler


def register(sub: Sub) -> None:
    policy = sub.add_parser(
        "policy",
        help="check, test, explain, diff, replay, sign and verify routing policies",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    policy_sub.required = True
    _add_check(policy_sub)
    _add_test(policy_sub)
    _add_explain(policy_sub)
    _add_diff(policy_sub)
    _add_replay(policy_sub)
    _add_signing(policy_sub)


def require_files(what: str, *paths: Path) -> None:
    """A file named on the command line that is not there is a usage error naming it
    (exit 2), not an invalid policy or cases file to run `policy check` on."""
    for path in paths:
        if not path.exists():
            raise UsageError(f"{what} not found: {path}")
        if path.is_dir():
            raise UsageError(f"{what} {path} is a directory, not a file")


def load_policy_or_report(path: Path) -> Policy | None:
    """The compiled policy, or None after printing its errors (the caller exits 1); a
    file that is not there is a `UsageError`."""
    from hybridroute.config import ConfigError
    from hybridroute.router.policy.schema import compile_policy

    require_files("policy file", path)
    try:
        return compile_policy(path)
    except ConfigError as exc:
        print(f"{path}: the policy is invalid (run 'hybridroute policy check'):", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return None


# --- check --------------------------------------------------------------------------


def _add_check(sub: Sub) -> None:
    p = sub.add_parser(
        "check",
        help="validate policy files: schema and meaning errors, warnings, with lines",
        description="Schema errors (unknown keys, bad values), meaning errors (unknown "
        "pools, routes and detectors, unsafe regexes, any path that could carry "
        "sensitive data to a cloud pool) and warnings (shadowed or never-matching rules, "
        "unused pools and routes). Exit 1 on any error, 2 when a file is missing.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--strict", action="store_true", help="warnings fail the check too")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.set_defaults(handler=_check)


def _check(args: argparse.Namespace) -> int:
    from hybridroute.router.policy.lint import check_policy_file

    require_files("policy file", *args.files)
    failed = False
    for path in args.files:
        report = check_policy_file(path)
        failed |= bool(report.errors) or (args.strict and bool(report.warnings))
        if args.json:
            print(json.dumps(_check_dict(report)))
            continue
        for message in report.messages:
            print(message)
        print(_check_summary(report))
    return EXIT_FAILED if failed else EXIT_OK


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_summary(report: CheckReport) -> str:
    counts = f"{_plural(len(report.errors), 'error')}, {_plural(len(report.warnings), 'warning')}"
    if report.policy is None:
        return f"{report.source}: INVALID: {counts}"
    p = report.policy
    return (
        f"{report.source}: OK: {counts} (sha256 {p.version_hash[:12]}; "
        f"{_plural(len(p.rules), 'rule')}, {_plural(len(p.routes), 'route')}, "
        f"{_plural(len(p.pools), 'pool')}, {_plural(len(p.detectors), 'detector')})"
    )


def _check_dict(report: CheckReport) -> dict[str, object]:
    return {
        "file": report.source,
        "valid": report.policy is not None,
        "version_hash": report.policy.version_hash if report.policy else None,
        "errors": [m.as_dict() for m in report.errors],
        "warnings": [m.as_dict() for m in report.warnings],
    }


# --- test ---------------------------------------------------------------------------


def _add_test(sub: Sub) -> None:
    p = sub.add_parser(
        "test",
        help="run test cases against a policy, offline; report rule coverage",
        description="Decide each case's request with the router's engine and compare with "
        "its `expect`. Prints each case, the trace of every failed one, rule coverage "
        "and 'N passed, M failed'. Exit 1 on any failure.",
    )
    p.add_argument("policy", type=Path, metavar="FILE")
    p.add_argument("cases", nargs="+", type=Path, metavar="CASES")
    p.add_argument(
        "--fail-under",
        type=_percent,
        metavar="PCT",
        help="fail when rule coverage is below PCT percent",
    )
    p.add_argument("--run", metavar="REGEX", help="only the cases whose name matches REGEX")
    p.add_argument("-v", "--verbose", action="store_true", help="show passing traces too")
    p.set_defaults(handler=_test)


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("a percentage is between 0 and 100")
    return value


def _test(args: argparse.Namespace) -> int:
    import re

    from hybridroute.config import ConfigError
    from hybridroute.router.policy import testing as pt
    from hybridroute.router.policy.render import trace_lines

    require_files("policy file", args.policy)
    require_files("cases file", *args.cases)
    policy = load_policy_or_report(args.policy)
    if policy is None:
        return EXIT_FAILED
    try:
        cases = pt.select(pt.load_case_files(args.cases), args.run)
    except ConfigError as exc:
        print(f"invalid cases file:\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    except re.error as exc:
        raise UsageError(f"--run: not a regular expression: {exc}") from None
    results = pt.run_cases(policy, cases)
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.loaded.case.name}  ({r.loaded.where})")
        for problem in r.problems:
            print(f"      {problem}")
        if not r.passed or args.verbose:
            print("\n".join(trace_lines(policy, r.decision, indent="      ")))
    cov = pt.coverage(policy, results)
    under = args.fail_under is not None and cov.percent < args.fail_under
    print(*_coverage_lines(policy, cov, args.fail_under if under else None), sep="\n")
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    if not results:
        print("no cases ran" + (f" (none matches --run {args.run!r})" if args.run else ""))
    return EXIT_FAILED if failed or under or not results else EXIT_OK


def _coverage_lines(policy: Policy, cov: Coverage, under: float | None) -> list[str]:
    done = len(cov.rules) - len(cov.missing)
    lines = ["", f"rule coverage: {done}/{len(cov.rules)} rules ({cov.percent:.1f}%)"]
    lines += [f"  not exercised: {r.id} ({policy.source}:{r.line})" for r in cov.missing]
    if not cov.default_reached:
        default = policy.default_route
        lines.append(f"  note: no case reaches default_route '{default}' (matches no rule)")
    if under is not None:
        lines.append(f"coverage {cov.percent:.1f}% is under --fail-under {under:g}%")
    return lines


# --- explain ------------------------------------------------------------------------


def _add_explain(sub: Sub) -> None:
    p = sub.add_parser(
        "explain",
        help="show how a policy decides one request: every rule, every detector hit",
        description="The request file is a case's `request:` (caller, model, metadata, "
        "inputs, parameters) or a whole case. Detector hits are shown by name, input and "
        "position, never by value.",
    )
    p.add_argument("policy", type=Path, metavar="FILE")
    p.add_argument("--request", required=True, type=Path, metavar="REQUEST.yaml")
    p.add_argument(
        "--session-pinned",
        action="store_true",
        help="decide as if the request's session already carried sensitive data",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_explain)


def _explain(args: argparse.Namespace) -> int:
    from hybridroute.config import ConfigError
    from hybridroute.router.policy.cases import facts_from_case
    from hybridroute.router.policy.render import explain_dict, explain_lines
    from hybridroute.router.policy.testing import explain_request, load_request

    require_files("policy file", args.policy)
    require_files("request file", args.request)
    policy = load_policy_or_report(args.policy)
    if policy is None:
        return EXIT_FAILED
    try:
        request = load_request(args.request)
    except ConfigError as exc:
        print(f"invalid request file:\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    decision, problems = explain_request(policy, request, session_pinned=args.session_pinned)
    if args.json:
        data = explain_dict(policy, decision)
        if request.expect is not None:
            data["expectation"] = {"passed": not problems, "problems": problems}
        print(json.dumps(data, indent=2))
    else:
        facts = facts_from_case(request.request, text_budget=policy.max_text_bytes)
        print("\n".join(explain_lines(policy, facts, decision, args.session_pinned)))
        if request.expect is not None:
            print("expectation: " + ("met" if not problems else "NOT met: " + "; ".join(problems)))
    return EXIT_FAILED if problems else EXIT_OK


# --- diff and replay: handlers in `policy.diff` and `policy.replay` --------------------


def _add_diff(sub: Sub) -> None:
    p = sub.add_parser(
        "diff",
        help="what changes between two policies: rules, settings, and case outcomes",
        description="Rules added, removed, changed or reordered; pools, routes, callers "
        "and detectors changed; and, with --cases, every case whose decision differs "
        "under NEW (cases that would newly go to the cloud first).",
    )
    p.add_argument("old", type=Path, metavar="OLD")
    p.add_argument("new", type=Path, metavar="NEW")
    p.add_argument("--cases", nargs="+", type=Path, default=[], metavar="CASES")
    p.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 when any case's outcome changes (as `git diff --exit-code`)",
    )
    p.set_defaults(handler=_lazy("hybridroute.router.policy.diff", "run_diff"))


def _add_replay(sub: Sub) -> None:
    p = sub.add_parser(
        "replay",
        help="re-decide the requests in an audit trail under a new policy",
        description="From the facts recorded for each decision (caller, auth, model, "
        "label, detector names and counts, session pin; never payloads), decide again "
        "under NEW and count the moves from each old route/zone to each new one. "
        "Requests that would newly go to the cloud are listed first.",
    )
    p.add_argument("policy", type=Path, metavar="NEW")
    p.add_argument("--db", required=True, type=Path, metavar="AUDIT", help="audit database")
    p.add_argument(
        "--since",
        metavar="TIME",
        help="only decisions at or after TIME: ISO 8601 (2025-01-31, 2025-01-31T08:00Z) "
        "or an age (90m, 24h, 7d)",
    )
    p.add_argument("--until", metavar="TIME", help="only decisions before TIME (same forms)")
    p.add_argument(
        "--limit", type=int, default=20, metavar="N", help="requests listed per group (20)"
    )
    p.add_argument(
        "--fail-on-cloud",
        action="store_true",
        help="exit 1 when any request would newly go to the cloud",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_lazy("hybridroute.router.policy.replay", "run_replay"))


# --- signing: handlers in `policy.sign_cli` ----------------------------------------


def _add_signing(sub: Sub) -> None:
    keygen = sub.add_parser(
        "keygen",
        help="make an Ed25519 policy signing keypair (DIR/NAME.key, DIR/NAME.pub)",
        description="The private key (0600) signs policies; give the .pub to routers "
        "(router config: policy_public_key). Refuses to overwrite without --force.",
    )
    keygen.add_argument("--out", required=True, type=Path, metavar="DIR")
    keygen.add_argument("--signer", required=True, metavar="NAME", help="e.g. secteam")
    keygen.add_argument("--force", action="store_true", help="replace existing key files")
    keygen.set_defaults(handler=_lazy("hybridroute.router.policy.sign_cli", "run_keygen"))
    sign = sub.add_parser(
        "sign",
        help="write a detached Ed25519 signature FILE.sig (the policy must be valid)",
        description="Signs the policy file's exact bytes together with the signer, the "
        "key's fingerprint and the time (the envelope is described in router/policy/signing.py).",
    )
    sign.add_argument("policy", type=Path, metavar="FILE")
    sign.add_argument("--key", required=True, type=Path, metavar="KEY", help="private key")
    sign.add_argument("--signer", metavar="NAME", help="default: the name in the key file")
    sign.add_argument("--out", type=Path, metavar="SIG", help="default: FILE.sig")
    sign.set_defaults(handler=_lazy("hybridroute.router.policy.sign_cli", "run_sign"))
    verify = sub.add_parser(
        "verify",
        help="check FILE.sig against a trusted public key",
        description="Exit 0 only when the signature was made by KEY over exactly FILE.",
    )
    verify.add_argument("policy", type=Path, metavar="FILE")
    verify.add_argument("--key", required=True, type=Path, metavar="PUB", help="public key")
    verify.add_argument("--signature", type=Path, metavar="SIG", help="default: FILE.sig")
    verify.set_defaults(handler=_lazy("hybridroute.router.policy.sign_cli", "run_verify"))
