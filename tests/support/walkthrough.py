"""Run the by-hand walkthrough of a Markdown page, as a person would, in one shell.

The page's walkthrough section is a sequence of fenced ``sh`` blocks (run, in order, in
one bash process, so ``export`` and ``cd`` carry over as in a terminal), ``json`` blocks
(the abridged output of the ``sh`` block before them) and ``text`` blocks (lines that
output contains); other blocks are prose. Services are started in
the docs with a trailing ``&`` and announce themselves with a ready line on stdout
(``{"event": "ready", ...}``); before the next block the runner waits for one ready line
per ``&``, as the reader is told to.

The docs use fixed, readable ports (``127.0.0.1:8180``, ``port: 9001``). Every such
port is replaced by a free one before a block runs, so the test never collides with
anything already listening.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

# Ports in the docs' blocks: an address on loopback, or a profile's ``port:`` field.
_PORT_IN_ADDRESS = re.compile(r"\b(127\.0\.0\.1|localhost):(\d{2,5})\b")
_PORT_FIELD = re.compile(r"\b(port:\s*)(\d{2,5})\b")
_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
_DONE = "@@tf-walkthrough-done"
_VALUE = "@@tf-walkthrough-value"

# Commands a reader of the walkthrough may be asked to run: the product, curl, and the
# shell's basics. Anything else (jq, python, sed, ...) would make the docs depend on a
# tool the README never asks for.
ALLOWED_COMMANDS = frozenset(
    {
        "tokenferry",
        "curl",
        "export",
        "cat",
        "cd",
        "echo",
        "printf",
        "grep",
        "mktemp",
        "kill",
        "wait",
        "rm",
        "jobs",
    }
)


class WalkthroughError(AssertionError):
    """A block failed, a service never became ready, or the page is malformed."""


@dataclass(frozen=True)
class Block:
    """One fenced ``sh`` block of the walkthrough, with the output the page shows for it."""

    number: int  # 1-based, in page order
    line: int  # line of the opening fence in the Markdown file
    text: str
    expected: tuple[Any, ...] = ()  # parsed ``json`` blocks that follow it
    expected_lines: tuple[str, ...] = ()  # lines of ``text`` blocks that follow it

    @property
    def services(self) -> int:
        """How many commands this block starts in the background (a trailing ``&``)."""
        return sum(1 for command in logical_lines(self.text) if _backgrounded(command))

    def where(self) -> str:
        return f"block {self.number} (line {self.line})"


def section(markdown: str, heading: str) -> tuple[int, str]:
    """The text under ``## heading`` up to the next ``## `` heading, and its first line."""
    lines = markdown.splitlines()
    for index, line in enumerate(lines):
        if line.strip() == f"## {heading}":
            end = next(
                (j for j in range(index + 1, len(lines)) if lines[j].startswith("## ")),
                len(lines),
            )
            return index + 2, "\n".join(lines[index + 1 : end])
    raise WalkthroughError(f"no section '## {heading}'")


def parse_blocks(markdown: str, heading: str) -> list[Block]:
    """The ``sh`` blocks of a section, each with the ``json`` blocks that follow it."""
    first_line, text = section(markdown, heading)
    found: list[tuple[int, str, str]] = []  # (line, language, body)
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, language = opening.groups()
        end = next(
            (j for j in range(index + 1, len(lines)) if lines[j].strip() == fence),
            None,
        )
        if end is None:
            raise WalkthroughError(f"line {first_line + index}: unterminated code block")
        found.append((first_line + index, language, "\n".join(lines[index + 1 : end]) + "\n"))
        index = end + 1
    blocks: list[Block] = []
    for line, language, body in found:
        if language == "sh":
            blocks.append(Block(len(blocks) + 1, line, body))
        elif language == "json":
            if not blocks:
                raise WalkthroughError(f"line {line}: a json block before any sh block")
            try:
                value = json.loads(body)
            except ValueError as exc:
                raise WalkthroughError(f"line {line}: json block does not parse: {exc}") from None
            blocks[-1] = replace(blocks[-1], expected=(*blocks[-1].expected, value))
        elif language == "text":
            if not blocks:
                raise WalkthroughError(f"line {line}: a text block before any sh block")
            shown = tuple(x.strip() for x in body.splitlines() if x.strip())
            blocks[-1] = replace(blocks[-1], expected_lines=(*blocks[-1].expected_lines, *shown))
    if not blocks:
        raise WalkthroughError(f"section '## {heading}' has no sh blocks")
    return blocks


def logical_lines(script: str) -> list[str]:
    """Commands of a script: continuation lines joined, heredoc bodies left out."""
    result: list[str] = []
    pending = ""
    terminator: str | None = None
    for line in script.splitlines():
        if terminator is not None:
            if line.strip() == terminator:
                terminator = None
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if not command or command.startswith("#"):
            continue
        result.append(command)
        heredoc = _HEREDOC.search(command)
        if heredoc is not None:
            terminator = heredoc.group(2)
    return result


def _backgrounded(command: str) -> bool:
    code = command.split(" #", 1)[0].rstrip()
    return code.endswith("&") and not code.endswith("&&")


def command_names(script: str) -> set[str]:
    """The first word of every simple command (roughly: split at ``;``, ``|``, ``&``, ``$(``)."""
    names: set[str] = set()
    for command in logical_lines(script):
        code = re.sub(r"'[^']*'|\"(?:[^\"\\]|\\.)*\"", "''", command.split(" #", 1)[0])
        for part in re.split(r"\$\(|&&|\|\||[;|&()]", code):
            words = [w for w in part.split() if not re.fullmatch(r"[A-Za-z_]\w*=\S*", w)]
            if words and not words[0].startswith(("<", ">", "2>")):
                names.add(words[0])
    return names


def ports_in(blocks: Iterable[Block]) -> set[int]:
    ports: set[int] = set()
    for block in blocks:
        ports.update(int(m.group(2)) for m in _PORT_IN_ADDRESS.finditer(block.text))
        ports.update(int(m.group(2)) for m in _PORT_FIELD.finditer(block.text))
    return ports


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out for port 0, all held open until all are chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def substitute_ports(text: str, mapping: Mapping[int, int]) -> str:
    def address(m: re.Match[str]) -> str:
        return f"{m.group(1)}:{mapping.get(int(m.group(2)), int(m.group(2)))}"

    def port_field(m: re.Match[str]) -> str:
        return f"{m.group(1)}{mapping.get(int(m.group(2)), int(m.group(2)))}"

    return _PORT_FIELD.sub(port_field, _PORT_IN_ADDRESS.sub(address, text))


def _json_spans(text: str) -> list[tuple[int, int, Any]]:
    """Every JSON object or array in some text: (start, end, value), in order."""
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int, Any]] = []
    index = 0
    while True:
        starts = [i for i in (text.find("{", index), text.find("[", index)) if i >= 0]
        if not starts:
            return spans
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            index = start + 1
            continue
        spans.append((start, end, value))
        index = end


def json_values(text: str) -> list[Any]:
    """Every JSON object or array in some output, in order (other text is skipped)."""
    return [value for _, _, value in _json_spans(text)]


def contains(actual: Any, shown: Any) -> bool:
    """Whether ``actual`` has everything ``shown`` shows (objects may have more keys)."""
    if isinstance(shown, dict):
        return isinstance(actual, dict) and all(
            key in actual and contains(actual[key], value) for key, value in shown.items()
        )
    if isinstance(shown, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(shown)
            and all(contains(a, s) for a, s in zip(actual, shown, strict=True))
        )
    return bool(actual == shown) and type(actual) is type(shown)


@dataclass
class BlockRun:
    block: Block
    script: str  # as run: ports substituted
    output: str  # stdout lines other than ready lines
    ready: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class WalkthroughShell:
    """One non-interactive bash in its own process group, fed one block at a time.

    ``set -euo pipefail`` makes a failing command end the shell, so a failing block
    fails the test (it is never skipped). Background services inherit the process group,
    so ``stop()`` can end everything the walkthrough started, whatever it did.
    """

    def __init__(self, workdir: Path, env: Mapping[str, str], *, ready_timeout: float = 30.0):
        self.workdir = workdir
        self.ready_timeout = ready_timeout
        self.blocks_dir = workdir / "blocks"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / "shell.stderr"
        self._stderr: IO[bytes] = open(self.stderr_path, "wb")  # noqa: SIM115 - child's stderr
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=workdir,
            env=dict(env),
            start_new_session=True,
        )
        self.pgid = self.proc.pid  # a new session: the shell leads its own process group
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready: list[dict[str, Any]] = []
        self.stdout_seen: list[str] = []
        self.services_started = 0  # commands run with a trailing `&` so far
        self._send("set -euo pipefail\n")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self._lines.put(raw.decode(errors="replace"))
        self._lines.put(None)

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died("the shell exited before") from None

    def _died(self, context: str) -> WalkthroughError:
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        return WalkthroughError(f"{context}: shell exit status {code}\n{self.stderr_tail()}")

    def stderr_tail(self, chars: int = 4000) -> str:
        self._stderr.flush()
        stdout = "".join(self.stdout_seen)[-chars:]
        stderr = self.stderr_path.read_text(errors="replace")[-chars:]
        return f"stdout (last lines):\n{stdout}\nstderr (last lines):\n{stderr}"

    def _next_line(self, deadline: float, waiting_for: str, *, services: int = 0) -> str:
        """The shell's next stdout line.

        Meanwhile the shell must stay alive (``set -e`` ends it on a failing command, but
        the services it started keep stdout open, so no end-of-file would tell) and at
        least ``services`` processes besides it must be running (a service that exits
        before its ready line, on a bad flag or a busy port, would otherwise only show up
        as a timeout).
        """
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WalkthroughError(f"timed out waiting for {waiting_for}\n{self.stderr_tail()}")
            try:
                line = self._lines.get(timeout=min(0.2, remaining))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise self._died(f"while waiting for {waiting_for}") from None
                if services:
                    running = [pid for pid in self.group_members() if pid != self.proc.pid]
                    if len(running) < services:
                        raise WalkthroughError(
                            f"a service exited while waiting for {waiting_for} "
                            f"({len(running)} of {services} running)\n{self.stderr_tail()}"
                        ) from None
                continue
            if line is None:
                raise self._died(f"while waiting for {waiting_for}")
            self.stdout_seen.append(line)
            return line

    def _take(self, line: str, run: BlockRun | None) -> None:
        """Sort a stdout line: services' ready lines, or output of the current block.

        Services started together share the terminal (here: a pipe), and a print() may
        reach it as two writes (the text, then the newline), so two ready lines can
        arrive glued on one line: each JSON object is looked at on its own.
        """
        rest = line
        for start, end, value in _json_spans(line):
            if isinstance(value, dict) and value.get("event") == "ready":
                self.ready.append(value)
                if run is not None:
                    run.ready.append(value)
                rest = rest.replace(line[start:end], "", 1)
        if run is not None and rest.strip():
            run.output += rest

    def run(self, block: Block, script: str, *, timeout: float = 60.0) -> BlockRun:
        """Run one block; return once it finished and every service it started is ready."""
        started = time.monotonic()
        path = self.blocks_dir / f"{block.number:02d}.sh"
        path.write_text(script)
        run = BlockRun(block, script, "")
        expected_ready = len(self.ready) + block.services
        self.services_started += block.services
        # stdin from /dev/null: the block's commands must not read the rest of this feed.
        self._send(f"source '{path}' </dev/null\nprintf '\\n{_DONE} {block.number}\\n'\n")
        deadline = started + timeout
        marker = f"{_DONE} {block.number}"
        while True:
            line = self._next_line(deadline, f"{block.where()} to finish")
            if line.strip() == marker:
                break
            self._take(line, run)
        deadline = time.monotonic() + self.ready_timeout
        while len(self.ready) < expected_ready:
            what = f"{expected_ready - len(self.ready)} ready line(s) of {block.where()}"
            self._take(self._next_line(deadline, what, services=self.services_started), run)
        run.seconds = time.monotonic() - started
        return run

    def value(self, expression: str, *, timeout: float = 10.0) -> str:
        """The shell's expansion of ``expression`` (e.g. ``"$DEMO"``) in its current state."""
        self._send(f"printf '\\n{_VALUE} %s\\n' {expression}\n")
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(deadline, f"the value of {expression}")
            if line.startswith(_VALUE + " "):
                return line[len(_VALUE) + 1 :].rstrip("\n")
            self._take(line, None)

    def group_members(self) -> list[int]:
        """Live (not zombie) processes in the shell's process group, from /proc."""
        members: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Fields after the parenthesised command name: state, ppid, pgrp, ...
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == self.pgid and fields[0] != "Z":
                members.append(int(entry.name))
        return members

    def wait_group_empty(self, *, exclude: Sequence[int] = (), timeout: float = 15.0) -> list[int]:
        """Wait (bounded) until the group has no live member but ``exclude``; return the rest."""
        deadline = time.monotonic() + timeout
        while True:
            left = [pid for pid in self.group_members() if pid not in exclude]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def stop(self) -> list[int]:
        """End the shell and everything it started: SIGTERM to the group, then SIGKILL.

        Returns the processes still alive in the group afterwards (none, normally).
        """
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            if not self.wait_group_empty(timeout=10.0):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._reader.join(5)
        self._stderr.close()
        return self.group_members()
