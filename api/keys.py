"""Manage API keys: `python -m api.keys create NAME [--scope write] | list | revoke NAME_OR_ID`.

The key is printed once (or written to `--output FILE`, mode 600) and never stored: the keys
file keeps its sha256 only. A revoked key stops working within the service's cache time (2 s by
default, at most 5 s)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from api.auth import SCOPES, KeyFile


def keys_file(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    from blocks.api_settings import resolve_api_settings

    return resolve_api_settings().keys_path()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", help="keys file (default: the APISettings block's, else "
                                       "<state folder>/api/keys.json)")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("name", help="who or what uses the key (shown in the Prefect UI)")
    create.add_argument("--scope", action="append", choices=SCOPES,
                        help="read, write or admin (admin includes write, write includes read); "
                             "repeatable; default read")
    create.add_argument("--output", help="write the key to this file (mode 600) instead of "
                                         "printing it")
    create.add_argument("--if-absent", action="store_true",
                        help="do nothing when an active key of this name exists")
    commands.add_parser("list", help="names, ids, scopes and dates (never the keys)")
    revoke = commands.add_parser("revoke", help="revoke a key by name or id")
    revoke.add_argument("name_or_id")
    args = parser.parse_args(argv)

    store = KeyFile(keys_file(args.file))
    try:
        if args.command == "create":
            if args.if_absent and any(r.name == args.name and r.active for r in store.read()):
                print(f"an active key named {args.name!r} exists in {store.path}; kept",
                      file=sys.stderr)
                return 0
            key, record = store.create(args.name, args.scope or ["read"])
            if args.output:
                out = Path(args.output).expanduser()
                out.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(key + "\n")
                os.chmod(out, 0o600)
                print(f"key {record.name!r} ({record.key_id}, scopes {record.scopes}) written to "
                      f"{out}", file=sys.stderr)
            else:
                print(key)
                print(f"key {record.name!r} ({record.key_id}, scopes {record.scopes}); shown "
                      "once, stored hashed in " + str(store.path), file=sys.stderr)
        elif args.command == "list":
            records = store.read()
            if not records:
                print(f"no keys in {store.path}")
            for r in records:
                state = f"revoked {r.revoked_at}" if r.revoked_at else "active"
                print(f"{r.key_id}  {r.name:<24} {','.join(r.scopes):<16} created "
                      f"{r.created_at}  {state}")
        else:
            r = store.revoke(args.name_or_id)
            print(f"revoked {r.name!r} ({r.key_id})")
    except (ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
