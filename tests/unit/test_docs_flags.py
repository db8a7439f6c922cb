"""docs/configuration.md and the real CLI must agree, in both directions.

The argparse tree is built exactly as ``tokenferry`` builds it (every command module
loaded) and walked recursively, so a command added later is checked without touching
this file. In the document, a command's section starts at a heading whose first code span
names it (`` ### `tokenferry provider create` ``) and runs to the next heading of the same
or a higher level, or the next command heading. Options count as documented when they
appear in the **first cell of a table row** of that section; prose may mention options
freely, but every ``--option`` anywhere in the document must exist somewhere in the CLI.

Environment variables: every ``TOKENFERRY_*`` name in the packages' source (and the
Dockerfile), plus every ``[env NAME]`` an option's help names, appears in the document,
and every ``TOKENFERRY_*`` name the document mentions exists. An option whose help names
its variable must have that variable in its own table row.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tokenferry.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
PACKAGES = ("tokenferry", "proxy", "addons", "gateway", "gateway_client")
EXTRA_SOURCES = ("Dockerfile",)

HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
CODE_SPAN = re.compile(r"`([^`]+)`")
LONG_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
ENV_NAME = re.compile(r"\bTOKENFERRY_[A-Z0-9_]+")
HELP_ENV = re.compile(r"\[env (TOKENFERRY_[A-Z0-9_]+)\]")
IGNORED_OPTIONS = frozenset({"--help"})


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]
    options: frozenset[str]
    # option -> environment variable named in its help text
    env: dict[str, str] = field(hash=False)


@dataclass
class Section:
    path: tuple[str, ...]
    level: int
    line: int
    rows: list[str] = field(default_factory=list)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[Command]:
    options: set[str] = set()
    env: dict[str, str] = {}
    children: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            children.extend(action.choices.items())
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        for option in longs:
            if option in IGNORED_OPTIONS:
                continue
            options.add(option)
            found = HELP_ENV.search(action.help or "")
            if found:
                env[option] = found.group(1)
    yield Command(path, frozenset(options), env)
    for name, child in children:
        yield from walk(child, (*path, name))


@pytest.fixture(scope="module")
def commands() -> dict[tuple[str, ...], Command]:
    found = {c.path: c for c in walk(build_parser(), ("tokenferry",))}
    # The tree really was walked: the root, a group, a leaf and a dev stand-in.
    for path in (
        ("tokenferry",),
        ("tokenferry", "provider"),
        ("tokenferry", "provider", "create"),
        ("tokenferry", "dev", "spiffe"),
    ):
        assert path in found, f"parser walk missed {' '.join(path)}"
    return found


def first_cell(row: str) -> str:
    cells = row.strip().strip("|").split("|")
    return cells[0] if cells else ""


def parse_sections(text: str) -> dict[tuple[str, ...], Section]:
    sections: dict[tuple[str, ...], Section] = {}
    current: Section | None = None
    in_fence = False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        heading = HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            span = CODE_SPAN.search(heading.group(2))
            words = tuple(span.group(1).split()) if span else ()
            if words and words[0] == "tokenferry":
                assert words not in sections, f"line {number}: second section for {span}"
                current = Section(words, level, number)
                sections[words] = current
            elif current is not None and level <= current.level:
                current = None
            continue
        if current is not None and line.lstrip().startswith("|"):
            current.rows.append(line)
    return sections


@pytest.fixture(scope="module")
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sections(doc_text: str) -> dict[tuple[str, ...], Section]:
    return parse_sections(doc_text)


def documented_options(section: Section) -> set[str]:
    return {o for row in section.rows for o in LONG_OPTION.findall(first_cell(row))}


def test_every_command_with_options_has_a_section(
    commands: dict[tuple[str, ...], Command], sections: dict[tuple[str, ...], Section]
) -> None:
    missing = [" ".join(p) for p, c in commands.items() if c.options and p not in sections]
    assert not missing, f"docs/configuration.md has no section for: {', '.join(missing)}"


def test_every_section_names_a_real_command(
    commands: dict[tuple[str, ...], Command], sections: dict[tuple[str, ...], Section]
) -> None:
    unknown = [f"line {s.line}: {' '.join(p)}" for p, s in sections.items() if p not in commands]
    assert not unknown, f"sections for commands the CLI does not have: {unknown}"


def test_every_option_is_documented_under_its_command(
    commands: dict[tuple[str, ...], Command], sections: dict[tuple[str, ...], Section]
) -> None:
    problems = []
    for path, command in commands.items():
        section = sections.get(path)
        if section is None:
            continue  # reported by the section test
        for option in sorted(command.options - documented_options(section)):
            problems.append(f"{' '.join(path)} {option}")
    assert not problems, f"options missing from their command's table: {problems}"


def test_every_documented_option_exists(
    commands: dict[tuple[str, ...], Command], sections: dict[tuple[str, ...], Section]
) -> None:
    problems = []
    for path, section in sections.items():
        command = commands.get(path)
        if command is None:
            continue  # reported by the section test
        for option in sorted(documented_options(section) - command.options):
            problems.append(f"line {section.line}: {' '.join(path)} {option}")
    assert not problems, f"documented options the command does not have: {problems}"


def test_options_mentioned_anywhere_exist(
    commands: dict[tuple[str, ...], Command], doc_text: str
) -> None:
    known = set().union(*(c.options for c in commands.values())) | IGNORED_OPTIONS
    mentioned = set(LONG_OPTION.findall(doc_text))
    assert not mentioned - known, f"options the CLI does not have: {sorted(mentioned - known)}"


def test_env_backed_options_name_their_variable_in_their_row(
    commands: dict[tuple[str, ...], Command], sections: dict[tuple[str, ...], Section]
) -> None:
    problems = []
    for path, command in commands.items():
        section = sections.get(path)
        for option, variable in command.env.items():
            rows = [
                r
                for r in (section.rows if section else [])
                if option in LONG_OPTION.findall(first_cell(r))
            ]
            if not any(variable in row for row in rows):
                problems.append(f"{' '.join(path)} {option}: {variable}")
    assert not problems, f"options whose row does not name their variable: {problems}"


def source_env_names(commands: dict[tuple[str, ...], Command]) -> set[str]:
    names: set[str] = set()
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    files += [ROOT / name for name in EXTRA_SOURCES if (ROOT / name).is_file()]
    for path in files:
        names.update(ENV_NAME.findall(path.read_text(encoding="utf-8")))
    for command in commands.values():
        names.update(command.env.values())
    # A name ending in "_" is a prefix that code completes (gateway.config.ENV_PREFIX).
    return {n for n in names if not n.endswith("_")}


def test_environment_variables_match_the_source(
    commands: dict[tuple[str, ...], Command], doc_text: str
) -> None:
    in_source = source_env_names(commands)
    assert "TOKENFERRY_GATEWAY" in in_source and "TOKENFERRY_GATEWAY_KEY" in in_source
    in_doc = set(ENV_NAME.findall(doc_text))
    assert not in_source - in_doc, f"undocumented variables: {sorted(in_source - in_doc)}"
    assert not in_doc - in_source, (
        f"documented variables nobody reads: {sorted(in_doc - in_source)}"
    )


def test_the_section_parser_finds_rows_and_stops_at_headings() -> None:
    text = "\n".join(
        [
            "## `tokenferry proxy`",
            "| `--listen HOST:PORT` | x |",
            "```",
            "| `--in-a-fence` | ignored |",
            "```",
            "### `tokenferry proxy ca`",
            "| `--pem` | `--listen` in a second cell does not count |",
            "## Other",
            "| `--after` | belongs to no command |",
        ]
    )
    parsed = parse_sections(text)
    assert documented_options(parsed[("tokenferry", "proxy")]) == {"--listen"}
    assert documented_options(parsed[("tokenferry", "proxy", "ca")]) == {"--pem"}
    assert set(parsed) == {("tokenferry", "proxy"), ("tokenferry", "proxy", "ca")}
