"""`vmkit remote …`: other vmkit daemons this one talks to (for migration). A remote's token is given once, at
`remote add`, and never printed."""

from __future__ import annotations

import argparse
import sys
import time

if False:  # see vmkit.cli.main: typing is not imported at run time
    from typing import Any

from vmkit.cli.client import Client
from vmkit.cli.output import emit, kv, print_json, print_table


def _url(name: str) -> str:
    from vmkit.cli.main import quote

    return f"/v1/remotes/{quote(name)}"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t is not None else "-"


def remote_add(c: Client, a: argparse.Namespace) -> int:
    from vmkit.cli.main import CliError

    token = a.remote_token
    if token == "-":  # from standard input, so that it shows in no process list
        token = sys.stdin.readline().strip()
        if not token:
            raise CliError("--token -: no token on standard input")
    body: dict[str, Any] = {"name": a.name, "url": a.remote_url, "token": token}
    if a.remote_fingerprint:
        body["fingerprint"] = a.remote_fingerprint
    r = c.post("/v1/remotes", body)
    if a.json:
        print_json(r)
        return 0
    version = f", vmkit {r['version']}" if r.get("version") else ""
    print(f"remote {r['name']} added: {r['url']}{version}")
    if r.get("fingerprint") and r.get("pinned_on_first_use"):
        print(f"pinned fingerprint {r['fingerprint']} (trust on first use: compare it with the tls_fingerprint "
              "that remote's daemon logs and shows at GET /v1)")  # fmt: skip
    elif r.get("fingerprint"):
        print(f"fingerprint {r['fingerprint']} verified and pinned")
    for note in r.get("notes") or []:
        sys.stderr.write(f"note: {note}\n")
    return 0


def remote_list(c: Client, a: argparse.Namespace) -> int:
    remotes = c.get("/v1/remotes")
    if a.json:
        print_json(remotes)
    else:
        print_table(
            ["name", "url", "fingerprint", "added"],
            [[r["name"], r["url"], r.get("fingerprint") or "- (plain http)", _when(r["created_at"])] for r in remotes],
        )
    return 0


def remote_info(c: Client, a: argparse.Namespace) -> int:
    r = c.get(_url(a.name))
    if a.json:
        print_json(r)
        return 0
    if r["reachable"]:
        rights = {True: "read-only token", False: "token may change things", None: "token rights unknown"}
        state = f"yes (vmkit {r.get('version') or '?'}; {rights[r.get('read_only')]})"
    else:
        state = f"NO — {r.get('error')}"
    kv(
        [
            ("Name", r["name"]),
            ("URL", r["url"]),
            ("Fingerprint", r.get("fingerprint") or "none (plain http)"),
            ("Added", _when(r["created_at"])),
            ("Reachable", state),
        ]
    )
    return 0


def remote_remove(c: Client, a: argparse.Namespace) -> int:
    c.request("DELETE", _url(a.name))
    return emit(a, {"removed": a.name}, f"remote {a.name} removed")


def add_parsers(nouns: Any, add: Any) -> None:
    rem = nouns.add_parser("remote", help="other vmkit daemons this one talks to").add_subparsers(
        dest="verb", required=True, metavar="VERB"
    )
    sp = add(rem, "add", remote_add, "add a remote daemon, checked at once (certificate, token, token's rights)")
    sp.add_argument("name")
    # Not the dests of --url, --token, --fingerprint: those are the global options, for reaching *this* daemon.
    sp.add_argument("remote_url", metavar="URL", help="its TCP listener: https://HOST:PORT (http:// on loopback only)")
    sp.add_argument(
        "--token",
        dest="remote_token",
        required=True,
        metavar="SECRET",
        help="an API token of that daemon, not read-only (- reads it from standard input); never shown again",
    )
    sp.add_argument(
        "--fingerprint",
        dest="remote_fingerprint",
        metavar="SHA256",
        help="its certificate's SHA-256 to pin; without it, the one it presents now is pinned (trust on first use)",
    )
    add(rem, "list", remote_list, "list remotes (never their tokens)")
    add(rem, "info", remote_info, "show a remote and whether it answers now").add_argument("name")
    add(rem, "remove", remote_remove, "forget a remote").add_argument("name")
