"""``tokenferry profile …``: work with provider profiles (SPEC §2, §7).

``profile lint FILE…`` validates profile files locally, printing every problem of every
file (not just the first) and exiting 1 when any file has an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tokenferry.profiles import Problem, Profile, ProfileError, load_profile_file, profile_files


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


def register(subparsers: Any) -> None:
    profile = subparsers.add_parser(
        "profile", help="provider profiles: validate", description=__doc__
    )
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
    lint.add_argument(
        "--output",
        choices=("table", "json"),
        default=argparse.SUPPRESS,
        help="output format (default: table, human-readable lines)",
    )
    lint.set_defaults(func=run_lint)
