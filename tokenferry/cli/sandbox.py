"""``tokenferry sandbox …``: sandbox registrations at the gateway (SPEC §6, §7).

A sandbox is known to the gateway by its supervisor's SPIFFE ID; only providers attached
to it can be used by that supervisor.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from tokenferry.cli.common import (
    add_command,
    add_gateway_options,
    format_time,
    info,
    output_format,
    print_fields,
    print_json,
    print_records,
    report_deleted,
    run_gateway,
)

if TYPE_CHECKING:
    from gateway_client import GatewayClient, SandboxRecord


def show_sandbox(args: argparse.Namespace, record: SandboxRecord) -> None:
    if output_format(args) == "json":
        print_json(record)
        return
    print_fields(
        [
            ("name", record.name),
            ("spiffe_id", record.spiffe_id),
            ("owner", record.owner),
            ("providers", ", ".join(record.providers)),
            ("created", format_time(record.created_at)),
            ("updated", format_time(record.updated_at)),
        ]
    )


def run_register(args: argparse.Namespace) -> int:
    # No --provider: keep what is attached (a re-register only changes the SPIFFE ID).
    providers = list(dict.fromkeys(args.provider)) if args.provider else None

    async def call(client: GatewayClient) -> SandboxRecord:
        return await client.put_sandbox(args.name, args.spiffe_id, providers)

    record = run_gateway(args, call)
    info(f"sandbox {record.name!r} registered as {record.spiffe_id}")
    show_sandbox(args, record)
    return 0


def run_attach(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> SandboxRecord:
        return await client.attach_provider(args.name, args.provider)

    record = run_gateway(args, call)
    info(f"provider {args.provider!r} attached to sandbox {record.name!r}")
    show_sandbox(args, record)
    return 0


def run_detach(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> SandboxRecord:
        return await client.detach_provider(args.name, args.provider)

    record = run_gateway(args, call)
    info(f"provider {args.provider!r} detached from sandbox {record.name!r}")
    show_sandbox(args, record)
    return 0


def run_list(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> list[SandboxRecord]:
        return await client.list_sandboxes()

    print_records(
        args,
        "sandboxes",
        run_gateway(args, call),
        ("NAME", "SPIFFE ID", "OWNER", "PROVIDERS"),
        lambda r: (r.name, r.spiffe_id, r.owner, ", ".join(r.providers)),
    )
    return 0


def run_get(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> SandboxRecord:
        return await client.get_sandbox(args.name)

    show_sandbox(args, run_gateway(args, call))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    async def call(client: GatewayClient) -> None:
        await client.delete_sandbox(args.name)

    run_gateway(args, call)
    report_deleted(args, "sandbox", "name", args.name)
    return 0


def register(subparsers: Any) -> None:
    group: argparse.ArgumentParser = subparsers.add_parser(
        "sandbox",
        help="sandboxes at the gateway: register, attach, detach, list",
        description=__doc__,
    )
    add_gateway_options(group)
    sub = group.add_subparsers(dest="sandbox_command", metavar="COMMAND", required=True)

    reg = add_command(
        sub,
        "register",
        run_register,
        help="register (or re-register) a sandbox's SPIFFE ID",
        description="Register a sandbox by its supervisor's SPIFFE ID. With --provider, "
        "the attached providers become exactly those given; without, they are kept.",
    )
    reg.add_argument("name", metavar="NAME")
    reg.add_argument(
        "--spiffe-id",
        required=True,
        metavar="ID",
        help="the supervisor's SPIFFE ID, e.g. spiffe://example.org/sandbox/NAME",
    )
    reg.add_argument(
        "--provider", action="append", metavar="P", help="attach this provider (repeatable)"
    )
    for name, func, text in (
        ("attach", run_attach, "attach a provider to a sandbox"),
        ("detach", run_detach, "detach a provider from a sandbox"),
    ):
        command = add_command(sub, name, func, help=text)
        command.add_argument("name", metavar="NAME")
        command.add_argument("provider", metavar="P")
    add_command(sub, "list", run_list, help="list sandboxes")
    get = add_command(sub, "get", run_get, help="show one sandbox")
    get.add_argument("name", metavar="NAME")
    delete = add_command(sub, "delete", run_delete, help="delete a sandbox registration")
    delete.add_argument("name", metavar="NAME")
