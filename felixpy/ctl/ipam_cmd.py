"""`felixctl ipam show|check|release|configure`: calicoctl's IPAM commands on our datastore.

The felixctl dispatcher calls `add_parser(subparsers)` once and `run(args, store)` when the
`ipam` command was chosen; run returns the exit code. User errors print one line to stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import Any, Sequence, TextIO

from felixpy.datastore import keys
from felixpy.datastore.api import Datastore, DatastoreError
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.block import Block, BlockError
from felixpy.ipam.check import check
from felixpy.ipam.config import IPAMConfig
from felixpy.ipam.errors import IPAMError


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser("ipam", help="IP address management")
    sub = parser.add_subparsers(dest="ipam_command", metavar="{show,check,release,configure}")
    sub.required = True

    show = sub.add_parser("show", help="show IP pool and block utilisation")
    show.add_argument("--show-blocks", action="store_true", help="one row per block too")
    show.add_argument("--ip", help="show whether IP is assigned and to what")
    show.add_argument("--show-configuration", action="store_true", help="show the IPAM configuration")

    chk = sub.add_parser("check", help="look for leaked and inconsistent IPAM data")
    chk.add_argument("-o", "--output", metavar="FILE", help="also write a JSON report to FILE")

    rel = sub.add_parser("release", help="release an IP address")
    group = rel.add_mutually_exclusive_group(required=True)
    group.add_argument("--ip", help="the IP address to release")
    group.add_argument("--from-report", metavar="FILE",
                       help="release the leaks listed in an `ipam check -o` report that are still leaked")

    conf = sub.add_parser("configure", help="change the IPAM configuration")
    conf.add_argument("--strictaffinity", type=_bool, help="true or false")
    conf.add_argument("--max-blocks-per-host", type=int, help="0 means the default (20)")
    return parser


def _percent(part: int, total: int) -> str:
    return f"{part} ({round(100 * part / total) if total else 0}%)"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str], header: bool) -> str:
        out = []
        for cell, width, r in zip(cells, widths, right):
            text = cell.center(width) if header else (cell.rjust(width) if r else cell.ljust(width))
            out.append(f" {text} ")
        return "|" + "|".join(out) + "|"

    return [rule, line(headers, True), rule, *(line(r, False) for r in rows), rule]


def _show(args: argparse.Namespace, store: Datastore, ipam: IPAM, out: TextIO) -> int:
    if args.show_configuration:
        config = ipam.get_config()
        settings = [
            ["StrictAffinity", str(config.strict_affinity).lower()],
            ["AutoAllocateBlocks", str(config.auto_allocate_blocks).lower()],
            ["MaxBlocksPerHost", str(config.max_blocks_per_host)],
        ]
        print("\n".join(_table(["PROPERTY", "VALUE"], settings, [False, False])), file=out)
        return 0
    if args.ip:
        ip = ipaddress.ip_address(args.ip)
        assignment = ipam.get_assignment(str(ip))
        if assignment is None:
            print(f"IP {ip} is not assigned", file=out)
            return 0
        print(f"IP {ip} is in use", file=out)
        print(f"  Block: {assignment.block_cidr}", file=out)
        print(f"  Handle: {assignment.handle}", file=out)
        for key, value in sorted(assignment.attrs.items()):
            print(f"  {key}: {value}", file=out)
        return 0
    blocks: list[Block] = []
    for kv in store.list(keys.block_prefix(4))[0]:
        if (kv.value or {}).get("deleted"):
            continue
        try:
            blocks.append(Block.from_json(kv.value))
        except BlockError:
            continue
    blocks.sort(key=lambda b: int(b.cidr.network_address))
    rows: list[list[str]] = []
    for pool in sorted(ipam.pools(), key=lambda p: int(p.cidr.network_address)):
        inside = [b for b in blocks if b.cidr.subnet_of(pool.cidr)]
        total = pool.cidr.num_addresses
        used = sum(b.in_use_count() for b in inside)
        rows.append(["IP Pool", str(pool.cidr), str(total), _percent(used, total), _percent(total - used, total)])
        if args.show_blocks:
            for b in inside:
                used_b = b.in_use_count()
                rows.append(["Block", str(b.cidr), str(b.size), _percent(used_b, b.size),
                             _percent(b.size - used_b, b.size)])
    headers = ["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"]
    print("\n".join(_table(headers, rows, [False, False, True, False, False])), file=out)
    return 0


def _release(args: argparse.Namespace, store: Datastore, ipam: IPAM, out: TextIO) -> int:
    if args.ip:
        ip = ipaddress.ip_address(args.ip)
        if ipam.get_assignment(str(ip)) is None:
            raise IPAMError(f"IP address {ip} is not assigned")
        if ipam.release_ips([str(ip)]):  # released by someone else in between
            raise IPAMError(f"IP address {ip} is not assigned")
        print(f"Successfully released IP address {ip}", file=out)
        return 0
    with open(args.from_report, encoding="utf-8") as f:
        reported = set(json.load(f).get("leakedIPs") or [])
    # Release only what is still leaked now: an address reused since the report is in use again.
    still = [ip for ip in check(store).leaked_ips() if ip in reported]
    not_released = ipam.release_ips(still)
    for leaked in still:
        if ipaddress.ip_address(leaked) not in not_released:
            print(f"Successfully released IP address {leaked}", file=out)
    print(f"Released {len(still) - len(not_released)} of {len(reported)} reported leaked IPs", file=out)
    return 0


def _configure(args: argparse.Namespace, ipam: IPAM, out: TextIO) -> int:
    current = ipam.get_config()
    if args.strictaffinity is None and args.max_blocks_per_host is None:
        raise IPAMError("nothing to configure: give --strictaffinity and/or --max-blocks-per-host")
    config = IPAMConfig(
        strict_affinity=current.strict_affinity if args.strictaffinity is None else args.strictaffinity,
        auto_allocate_blocks=current.auto_allocate_blocks,
        max_blocks_per_host=current.max_blocks_per_host if args.max_blocks_per_host is None
        else args.max_blocks_per_host,
    )
    ipam.set_config(config)
    print("Successfully set IPAM configuration", file=out)
    return 0


def run(args: argparse.Namespace, store: Datastore, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    ipam = IPAM(store, cache_ttl=0)
    try:
        if args.ipam_command == "show":
            return _show(args, store, ipam, out)
        if args.ipam_command == "check":
            report = check(store)
            print("\n".join(report.lines()), file=out)
            if args.output:
                with open(args.output, "w", encoding="utf-8") as f:
                    json.dump(report.to_json(), f, indent=2)
                print(f"Report written to {args.output}", file=out)
            return 0
        if args.ipam_command == "release":
            return _release(args, store, ipam, out)
        if args.ipam_command == "configure":
            return _configure(args, ipam, out)
        raise IPAMError(f"unknown ipam command {args.ipam_command!r}")
    except (IPAMError, DatastoreError, ValueError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=err)
        return 1
