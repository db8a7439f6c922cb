"""``tokenferry profile …``: work with provider profiles (SPEC §2, §7).

``profile lint FILE…`` validates profile files locally, printing every problem of every
file (not just the first) and exiting 1 when any file has an error. ``profile import
FILE`` validates locally the same way, then registers the profile at the gateway;
``profile list`` and ``profile show ID`` read the gateway's profiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tokenferry.cli.common import (
    add_command,
    add_gateway_options,
    add_output_option,
    format_time,
    info,
    output_format,
    print_fields,
    print_json,
    print_records,
    print_table,
    report_deleted,
    run_gateway,
)
from tokenferry.profiles import Problem, Profile, ProfileError, load_profile_file, profile_files

if TYPE_CHECKING:
    from gateway_client import GatewayClient, ProfileRecord


@dataclass(frozen=True)
class LintResult:
    """The outcome for one file: the profile when valid, and everything found."""

    file: str
    profile: Profile | None
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]

    @property
    def valid(self) -> bool:
        return self.profile is not None and not self.errors


def lint_file(path: str) -> LintResult:
    try:
        profile, warnings = load_profile_file(path)
    except ProfileError as exc:
        return LintResult(path, None, exc.problems, exc.warnings)
    return LintResult(path, profile, (), warnings)


def visible_source(text: str) -> tuple[str, int]:
    """``text`` for a terminal, and how many characters had to be escaped.

    A profile source is reviewed by reading it (docs/security.md), and anyone may have
    registered it: bidi overrides, zero-width and other format characters, and a lone
    carriage return could make it read differently from what the parser sees. Those are
    shown as ``\\uXXXX`` (``\\UXXXXXXXX``) escapes; tabs and line ends (LF, CRLF) are kept.
    """
    out: list[str] = []
    escaped = 0
    for ch in text.replace("\r\n", "\n"):
        if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp"):
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
            escaped += 1
    return "".join(out), escaped


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _print_text(results: list[LintResult], out: TextIO) -> None:
    for result in results:
        # Errors first: they are what stops the file from loading.
        for problem in result.errors:
            print(f"error: {problem}", file=out)
        for problem in result.warnings:
            print(f"warning: {problem}", file=out)
        if result.profile is not None:
            profile = result.profile
            print(
                f"ok: {result.file}: profile {profile.id!r} "
                f"({_plural(len(profile.credentials), 'credential')}, "
                f"{_plural(len(profile.endpoints), 'endpoint')})",
                file=out,
            )
    invalid = sum(1 for r in results if not r.valid)
    errors = sum(len(r.errors) for r in results)
    warnings = sum(len(r.warnings) for r in results)
    print(
        f"{_plural(len(results), 'file')} checked: {len(results) - invalid} valid, "
        f"{invalid} invalid ({_plural(errors, 'error')}, {_plural(warnings, 'warning')})",
        file=out,
    )


def _print_json(results: list[LintResult], out: TextIO) -> None:
    document: dict[str, Any] = {
        "valid": all(r.valid for r in results),
        "errors": sum(len(r.errors) for r in results),
        "warnings": sum(len(r.warnings) for r in results),
        "files": [
            {
                "file": r.file,
                "valid": r.valid,
                "profile_id": r.profile.id if r.profile is not None else None,
                "problems": [p.to_dict() for p in (*r.errors, *r.warnings)],
            }
            for r in results
        ],
    }
    json.dump(document, out, indent=2)
    out.write("\n")


def lint_paths(paths: list[str]) -> list[LintResult]:
    """Lint files; a directory stands for its profile files, whose ids must be unique."""
    results: list[LintResult] = []
    for path in paths:
        directory = Path(path)
        if not directory.is_dir():
            results.append(lint_file(path))
            continue
        first_file: dict[str, str] = {}
        for file in profile_files(directory):
            result = lint_file(str(file))
            if result.profile is not None:
                profile_id = result.profile.id
                if profile_id in first_file:
                    duplicate = Problem(
                        result.file,
                        "id",
                        f"duplicate profile id {profile_id!r} (also in {first_file[profile_id]})",
                    )
                    result = LintResult(result.file, None, (duplicate,), result.warnings)
                else:
                    first_file[profile_id] = result.file
            results.append(result)
    return results


def run_lint(args: argparse.Namespace) -> int:
    results = lint_paths(args.files)
    # ``--output`` may also be a global option added on the main parser; both spellings
    # use the same dest, and "table" is the human-readable default.
    if getattr(args, "output", "table") == "json":
        _print_json(results, sys.stdout)
    else:
        _print_text(results, sys.stdout)
    return 0 if all(r.valid for r in results) else 1


# --------------------------------------------------------------------------- gateway


def _print_problems(problems: tuple[Problem, ...] | list[Problem], prefix: str = "") -> None:
    for problem in problems:
        print(f"{problem.severity}: {prefix}{problem}", file=sys.stderr)


def _server_problems(exc: Exception) -> list[Problem]:
    raw = getattr(exc, "extra", {}).get("problems")
    problems: list[Problem] = []
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, dict):
                problems.append(
                    Problem(
                        source="gateway",
                        path=str(item.get("path", "")),
                        message=str(item.get("message", "")),
                        severity="error" if item.get("severity", "error") == "error" else "warning",
                    )
                )
    return problems


def _parsed(record: ProfileRecord) -> Profile:
    from tokenferry.cli.main import UserError

    try:
        return record.profile()
    except ProfileError as exc:
        # A gateway newer than this CLI may hold profiles it cannot read; -o json still can.
        raise UserError(
            f"profile {record.id!r} from the gateway cannot be read by this CLI ({exc}); "
            "try --output json"
        ) from None


def show_profile_record(args: argparse.Namespace, record: ProfileRecord) -> None:
    if output_format(args) == "json":
        print_json(record)
        return
    profile = _parsed(record)
    print_fields(
        [
            ("id", record.id),
            ("display_name", record.display_name),
            ("description", record.description),
            ("category", record.category),
            ("created", format_time(record.created_at)),
        ]
    )
    broker_only = profile.broker_only_credentials()
    rows: list[tuple[str, str, str | None, str | None, str | None]] = []
    for credential in profile.credentials:
        grant = credential.token_grant
        if grant is None:
            kind = "subject (gateway only)" if credential.name in broker_only else "static"
            rows.append((credential.name, kind, None, None, None))
            continue
        subject = grant.subject_token.credential if grant.subject_token else None
        rows.append(
            (
                credential.name,
                grant.grant_type,
                grant.audience,
                " ".join(grant.scopes),
                subject,
            )
        )
    print_table(("CREDENTIAL", "KIND", "AUDIENCE", "SCOPES", "SUBJECT CREDENTIAL"), rows)
    print_table(
        ("HOST", "PORT", "PATH", "TLS"),
        [(e.host, e.port, e.path or "(any)", e.tls) for e in profile.endpoints],
    )


def run_import(args: argparse.Namespace) -> int:
    from tokenferry.cli.main import UserError

    # Local validation first: every problem at once, and nothing is sent when invalid.
    result = lint_file(args.file)
    _print_problems(result.errors)
    _print_problems(result.warnings)
    if not result.valid:
        raise UserError(
            f"{args.file}: {_plural(len(result.errors), 'error')}; "
            "nothing was sent to the gateway (see tokenferry profile lint)"
        )
    try:
        source = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {args.file}: {exc}") from None

    async def call(client: GatewayClient) -> ProfileRecord:
        from gateway_client import InvalidRequest

        try:
            return await client.create_profile(source)
        except InvalidRequest as exc:
            problems = _server_problems(exc)
            if not problems:
                raise
            _print_problems(problems)
            raise UserError(
                f"the gateway rejected {args.file}: {_plural(len(problems), 'problem')}"
            ) from None

    record = run_gateway(args, call)
    # Warnings the gateway found that the local check did not (a newer gateway).
    local = {(w.path, w.message) for w in result.warnings}
    _print_problems([w for w in record.warnings if (w.path, w.message) not in local], "gateway: ")
    info(f"profile {record.id!r} imported")
    show_profile_record(args, record)
    return 0


def run_list(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> list[ProfileRecord]:
        return await client.list_profiles()

    def row(record: ProfileRecord) -> tuple[object, ...]:
        profile = _parsed(record)
        return (
            record.id,
            record.display_name,
            record.category,
            ", ".join(c.name for c in profile.credentials),
            len(profile.endpoints),
        )

    print_records(
        args,
        "profiles",
        run_gateway(args, call),
        ("ID", "NAME", "CATEGORY", "CREDENTIALS", "ENDPOINTS"),
        row,
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> ProfileRecord:
        return await client.get_profile(args.id)

    record = run_gateway(args, call)
    if args.source:
        source, escaped = visible_source(record.source)
        sys.stdout.write(source if source.endswith("\n") else source + "\n")
        if escaped:
            count = _plural(escaped, "invisible or control character")
            info(f"warning: profile {record.id!r}: {count} shown as \\u escapes")
        return 0
    show_profile_record(args, record)
    return 0


def run_delete(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> None:
        await client.delete_profile(args.id)

    run_gateway(args, call)
    report_deleted(args, "profile", "id", args.id)
    return 0


def register(subparsers: Any) -> None:
    profile = subparsers.add_parser(
        "profile",
        help="provider profiles: lint locally; import, list, show at the gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_gateway_options(profile)
    profile_sub = profile.add_subparsers(dest="profile_command", metavar="COMMAND", required=True)
    lint: argparse.ArgumentParser = profile_sub.add_parser(
        "lint",
        help="validate profile files (exit 1 on any error)",
        description=(
            "Validate provider profile files (YAML or JSON) and print every problem. "
            "Exit 0 when all files are valid (warnings allowed), 1 otherwise."
        ),
    )
    lint.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="profile file(s) to check; a directory means its *.yaml, *.yml and *.json files",
    )
    add_output_option(lint)
    lint.set_defaults(func=run_lint)

    imp = add_command(
        profile_sub,
        "import",
        run_import,
        help="validate a profile file, then register it at the gateway",
    )
    imp.add_argument("file", metavar="FILE", help="profile file (YAML or JSON)")
    add_command(profile_sub, "list", run_list, help="list the gateway's profiles")
    show = add_command(profile_sub, "show", run_show, help="show one registered profile")
    show.add_argument("id", metavar="ID")
    show.add_argument(
        "--source", action="store_true", help="print the profile's YAML/JSON source as imported"
    )
    delete = add_command(profile_sub, "delete", run_delete, help="delete a profile (admins only)")
    delete.add_argument("id", metavar="ID")
