"""`hybridroute certs ...`: mint the dev PKI, issue extra leaves, show certificates.

The commands are thin: the work lives in `pki` and `credentials`, so tests and
`hybridroute up` call the same code without a subprocess. This module only turns
arguments into calls, library errors into `UsageError`, and results into a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from hybridroute.certs.credentials import CredentialsError, describe_certificate
from hybridroute.certs.pki import (
    DEFAULT_APP,
    DEFAULT_LEAF_DAYS,
    IssuedCert,
    PkiExistsError,
    init_pki,
    issue_leaf,
)
from hybridroute.cli import UsageError, whole_number

__all__ = ["format_table", "register"]

_HEADERS = ("FILE", "IDENTITY", "SANS", "USAGE", "EXPIRES")


def _expiry(when: dt.datetime | None) -> str:
    return "-" if when is None else f"{when:%Y-%m-%d}"


def format_table(rows: Sequence[Sequence[str]], headers: Sequence[str] = _HEADERS) -> str:
    """Left-aligned columns, two spaces apart: readable in a terminal, easy to grep."""
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in (headers, *rows)
    ]
    return "\n".join(line.rstrip() for line in lines)


def _issued_rows(issued: Sequence[IssuedCert], root: Path) -> list[list[str]]:
    rows = []
    for item in issued:
        files = f"{_rel(item.cert, root)}, {_rel(item.key, root)}"
        sans = ", ".join(item.sans) or "-"
        rows.append([files, item.identity, sans, item.usage, _expiry(item.not_after)])
    return rows


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _refusal(exc: PkiExistsError, force_means: str = "use --force to replace them") -> UsageError:
    """Name every file in the way, compactly: they usually share one directory."""
    dirs = {p.parent for p in exc.paths}
    if len(dirs) == 1:
        where, names = f" in {dirs.pop()}/", ", ".join(p.name for p in exc.paths)
    else:
        where, names = "", ", ".join(str(p) for p in exc.paths)
    return UsageError(
        f"refusing to overwrite existing files{where}: {names}; nothing was written ({force_means})"
    )


# What `init --force` does, said where it is refused: the CA is new, so everything the
# old one signed stops being trusted; the audit keypair is kept (see certs/pki.py).
_INIT_FORCE = (
    "--force makes a new CA and replaces every certificate and key, so certificates "
    "issued by the old CA stop being trusted; it keeps audit-signing.key/.pub, which "
    "existing audit trails verify with"
)


def _cmd_init(args: argparse.Namespace) -> int:
    out: Path = args.out
    try:
        issued = init_pki(
            out, apps=args.app or [DEFAULT_APP], sans=args.san, days=args.days, force=args.force
        )
    except PkiExistsError as exc:
        raise _refusal(exc, _INIT_FORCE) from exc
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    print(f"created a dev PKI in {out}/ (private keys are mode 0600; keep ca.key secret)")
    print(format_table(_issued_rows(issued, out)))
    for item in issued:
        if item.kept:
            print(
                f"kept the existing audit signing keypair ({_rel(item.key, out)}, "
                f"{_rel(item.cert, out)}): the audit trails signed with it stay verifiable. "
                "To rotate it, move both files away, run this again, and verify older "
                "trails with `hybridroute audit verify --key OLD.pub --key NEW.pub`."
            )
    return 0


def _cmd_issue(args: argparse.Namespace) -> int:
    if not (args.client or args.server):
        raise UsageError("say what the certificate is for: --client, --server or both")
    out: Path = args.out or args.ca_dir
    try:
        issued = issue_leaf(
            args.ca_dir,
            args.name,
            client=args.client,
            server=args.server,
            sans=args.san or None,
            days=args.days,
            out=out,
            stem=args.stem,
            force=args.force,
        )
    except PkiExistsError as exc:
        raise _refusal(exc) from exc
    except (ValueError, OSError, CredentialsError) as exc:
        raise UsageError(str(exc)) from exc
    print(format_table(_issued_rows([issued], out)))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    rows = []
    for path in args.files:
        try:
            info = describe_certificate(path)
        except CredentialsError as exc:
            raise UsageError(str(exc)) from exc
        usage = "+".join(info.usages) or "-"
        name = info.common_name or "-"
        rows.append([str(path), name, ", ".join(info.sans) or "-", usage, _expiry(info.not_after)])
    print(format_table(rows))
    return 0


def _add_common(
    parser: argparse.ArgumentParser, san_help: str, force_help: str | None = None
) -> None:
    parser.add_argument("--san", action="append", default=[], metavar="HOST", help=san_help)
    parser.add_argument(
        "--days",
        type=whole_number(1),
        default=DEFAULT_LEAF_DAYS,
        help=f"validity of the leaf certificates in days (default {DEFAULT_LEAF_DAYS})",
    )
    parser.add_argument(
        "--force", action="store_true", help=force_help or "overwrite existing files"
    )


def _register_init(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = actions.add_parser(
        "init",
        help="create a dev CA and the router, node, cloud and app certificates",
        description="Create a private CA, certificates for router, node, cloud and each app, "
        "and the audit signing keypair. Refuses to overwrite anything without --force; "
        "with it, replaces everything but an existing audit signing keypair (existing "
        "audit trails verify only with it).",
    )
    init.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    init.add_argument(
        "--app",
        action="append",
        metavar="NAME",
        help=f"client identity to issue an app-NAME certificate for (repeatable; "
        f"default {DEFAULT_APP})",
    )
    _add_common(
        init,
        "extra DNS name or IP address for router, node and cloud (repeatable)",
        "replace the CA, certificates and keys (never the audit signing keypair)",
    )
    init.set_defaults(handler=_cmd_init)


def _register_issue(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    issue = actions.add_parser(
        "issue",
        help="issue one more certificate from an existing CA (new identity or rotation)",
    )
    issue.add_argument("name", help="identity (certificate CN); also the default DNS SAN")
    issue.add_argument(
        "--ca-dir", type=Path, required=True, metavar="DIR", help="holds ca.pem/ca.key"
    )
    issue.add_argument("--client", action="store_true", help="usable as a TLS client")
    issue.add_argument("--server", action="store_true", help="usable as a TLS server")
    issue.add_argument(
        "--out", type=Path, metavar="DIR", help="output directory (default: --ca-dir)"
    )
    issue.add_argument("--stem", metavar="STEM", help="write STEM.pem/STEM.key (default: NAME)")
    _add_common(issue, "DNS name or IP address for the certificate (repeatable; default NAME)")
    issue.set_defaults(handler=_cmd_issue)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `hybridroute certs {init,issue,show}` to the top-level parser."""
    certs = sub.add_parser("certs", help="dev PKI: CA, certificates and keys")
    actions = certs.add_subparsers(dest="certs_command", metavar="ACTION")
    actions.required = True
    _register_init(actions)
    _register_issue(actions)
    show = actions.add_parser("show", help="describe certificate files")
    show.add_argument("files", nargs="+", type=Path, metavar="FILE")
    show.set_defaults(handler=_cmd_show)
