"""`dnsgate config check|schema|env`: a configuration checked and shown as serve would run with it,
the file's JSON Schema, and every key's DNSGATE_* variable (dnsgate.config_check derives them)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_commands(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    config = commands.add_parser("config", help="check a configuration, or print its JSON Schema or its variables")
    actions = config.add_subparsers(dest="action", required=True, parser_class=parser_class)
    check = actions.add_parser(
        "check", help="validate the configuration serve would run with (file, DNSGATE_* variables, defaults) and "
                      "print it; exit 2 naming the file, line and key of an error")
    check.add_argument("--config", metavar="FILE", help="TOML configuration (env DNSGATE_CONFIG; default: none)")
    actions.add_parser("schema", help="the configuration file's JSON Schema, for editors")
    actions.add_parser("env", help="every key's DNSGATE_* variable, as a Markdown table")


def run(args: argparse.Namespace) -> int:
    from dnsgate import config_check  # only this command needs it

    if args.action == "schema":
        print(json.dumps(config_check.schema(), indent=2))
        return 0
    if args.action == "env":
        sys.stdout.write(config_check.env_table())
        return 0
    code, text = config_check.check(args.config, os.environ)
    print(text, file=sys.stderr if code else sys.stdout, end="" if text.endswith("\n") else "\n")
    return code
