"""`felixctl ipam show|check|release|configure|split`: calicoctl's IPAM commands on our datastore.

The felixctl dispatcher calls `add_parser(subparsers)` once and `run(args, store)` when the
`ipam` command was chosen; run returns the exit code. User errors print one line to stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import Any, Sequence, TextIO

from felixpy.datastore.api import Datastore, DatastoreError
from felixpy.ipam import usage
from felixpy.ipam.allocator import IPAM, ReleaseOptions
from felixpy.ipam.check import LEAK, check
from felixpy.ipam.config import IPAMConfig
from felixpy.ipam.errors import IPAMError
from felixpy.ipam.split import split_pool


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser("ipam", help="IP address management")
    sub = parser.add_subparsers(dest="ipam_command", metavar="{show,check,release,configure,split}")
    sub.required = True

    show = sub.add_parser("show", help="show IP pool and block utilisation")
    show.add_argument("--show-blocks", action="store_true", help="one row per block too")
    show.add_argument("--ip", help="show whether IP is assigned and to what")
    show.add_argument("--show-configuration", action="store_true", help="show the IPAM configuration")
    show.add_argument("--show-borrowed", action="store_true",
                      help="list addresses a node took from a block affine to another node (or to none)")

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

    split = sub.add_parser("split", help="split an IP pool into N (a power of 2) equal pools; "
                                         "needs `felixctl datastore migrate lock` first")
    split.add_argument("number", metavar="N", type=int, help="how many pools (2, 4, 8, ...)")
    which = split.add_mutually_exclusive_group(required=True)
    which.add_argument("--cidr", help="CIDR of the IP pool to split")
    which.add_argument("--name", help="name of the IP pool to split")
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
    if args.show_borrowed:
        borrowed, unclassified = usage.borrowed(store)
        rows = [[b.ip, b.borrowing_node, b.block, b.block_owner, b.type, b.allocated_to] for b in borrowed]
        headers = ["IP", "BORROWING-NODE", "BLOCK", "BLOCK OWNER", "TYPE", "ALLOCATED-TO"]
        print("\n".join(_table(headers, rows, [False] * len(headers))), file=out)
        if unclassified:
            print(f"\nNote: found {unclassified} IP allocations without an explicit node association. "
                  "Unable to determine if they are borrowed.", file=out)
        return 0
    rows = []
    for pool_use in usage.utilisation(store, ipam.pools(), ipam.reservations()):
        rows.append(_usage_row("IP Pool", pool_use))
        if args.show_blocks:
            rows.extend(_usage_row("Block", b) for b in pool_use.blocks)
    # IN USE counts allocated addresses and RESERVED those an IPReservation covers (an address
    # allocated before it was reserved counts in both); FREE is what neither holds.
    headers = ["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS RESERVED", "IPS FREE"]
    print("\n".join(_table(headers, rows, [False, False, True, False, False, False])), file=out)
    return 0


def _usage_row(grouping: str, use: usage.Utilisation) -> list[str]:
    return [grouping, use.cidr, str(use.total), _percent(use.in_use, use.total),
            _percent(use.reserved, use.total), _percent(use.free, use.total)]


def _release(args: argparse.Namespace, store: Datastore, ipam: IPAM, out: TextIO) -> int:
    if args.ip:
        ip = ipaddress.ip_address(args.ip)
        assignment = ipam.get_assignment(str(ip))
        if assignment is None:
            raise IPAMError(f"IP address {ip} is not assigned")
        # Guarded by what was just read: an address released and assigned again in between is
        # somebody else's now and stays allocated.
        outcome = ipam.release([ReleaseOptions(str(ip), assignment.handle, assignment.sequence_number)])
        if outcome.stale:
            raise IPAMError(outcome.stale[0])
        if outcome.not_allocated:  # released by someone else in between
            raise IPAMError(f"IP address {ip} is not assigned")
        print(f"Successfully released IP address {ip}", file=out)
        return 0
    with open(args.from_report, encoding="utf-8") as f:
        report = json.load(f)
    reported = {str(p["ip"]): p for p in report.get("problems") or []
                if isinstance(p, dict) and p.get("kind") == LEAK and p.get("ip")}
    for ip in report.get("leakedIPs") or []:  # reports without problem details name only the address
        reported.setdefault(str(ip), {"ip": str(ip)})
    # Release only what is still leaked now (an address in use again since the report stays),
    # and only the very allocation the report saw: its handle and sequence number must match.
    still = [ip for ip in check(store).leaked_ips() if ip in reported]
    options = [ReleaseOptions(ip, reported[ip].get("handle"), _sequence(reported[ip].get("sequenceNumber")))
               for ip in still]
    outcome = ipam.release(options)
    for released in outcome.released:
        print(f"Successfully released IP address {released}", file=out)
    for reason in outcome.stale:
        print(f"Not released: {reason} (the report is out of date; run `ipam check -o` again)", file=out)
    print(f"Released {len(outcome.released)} of {len(reported)} reported leaked IPs", file=out)
    return 0


def _sequence(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise IPAMError(f"invalid sequenceNumber {value!r} in the report")
    return value


def _split(args: argparse.Namespace, store: Datastore, out: TextIO) -> int:
    from felixpy.ctl.migrate import is_locked

    if not is_locked(store):
        raise IPAMError("datastore is not locked: run `felixctl datastore migrate lock` before splitting an IP pool")
    result = split_pool(store, args.number, name=args.name, cidr=args.cidr)
    print(f"IP Pool {result.old_name} was successfully split into {len(result.created)} smaller pools.", file=out)
    for name, cidr in result.created:
        print(f"Created {name} with CIDR {cidr}.", file=out)
    print("Unlock the datastore (`felixctl datastore migrate unlock`) when done.", file=out)
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
        if args.ipam_command == "split":
            return _split(args, store, out)
        raise IPAMError(f"unknown ipam command {args.ipam_command!r}")
    except (IPAMError, DatastoreError, ValueError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=err)
        return 1
