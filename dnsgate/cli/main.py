"""Command line: `dnsgate serve`, the commands that call a running server's admin API (`consent …`,
`explain`, `log`, `report`, `store acknowledge`), `store migrate`, `config …` and `cert init`.

One convention for all of them: errors are one line naming the culprit; exit status 0 for success,
1 for a failure at run time (a port in use, dnsgate unreachable, a refusal by its API, a failed
migration), 2 for bad input (flags, configuration, a value), and 3 for `report` whose verdict fails.
The commands that call the API find the server and its admin token exactly as `serve` finds its
settings: --config / DNSGATE_CONFIG, --data-dir and the DNSGATE_* variables, the config file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn

from dnsgate import __version__
from dnsgate.cli import config as config_cli
from dnsgate.cli import health
from dnsgate.cli import log_and_report as observe_cli
from dnsgate.cli.admin_client import (
    AdminClient,
    AdminError,
    api_base_url,
    api_to_call,
    lines_of_copied_grants,
    lines_of_view,
)
from dnsgate.config import (
    Config,
    ConfigError,
    Overrides,
    load_config,
    merge_overrides,
    overrides_from_env,
    parse_api_listen,
    parse_host_port,
    parse_upstreams,
)
from dnsgate.consent.export import PAIRED_GRANT
from dnsgate.lazy_imports import defer_init
from dnsgate.logs import setup_logging
from dnsgate.loops import loop_factory
from dnsgate.timespec import parse_when

if TYPE_CHECKING:
    from dnsgate.app.primary import Running


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line that names the help of the command used (`dnsgate consent list`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The innermost command parsed sets the last value: what an unrecognized argument, which only
        # the top parser reports, is hinted at.
        self.set_defaults(command_path=self.prog)

    def error(self, message: str) -> NoReturn:
        self.usage_error(self.prog, message)

    def usage_error(self, command_path: str, message: str) -> NoReturn:
        self.exit(2, f"dnsgate: error: {message} (see '{command_path} --help')\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: None = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
            # before the command, argparse would only say that the command is missing
            self.usage_error(self.prog, f"unrecognized arguments: {argv[0]} (options go after the command)")
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.usage_error(parsed.command_path, f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def load_server() -> None:
    """Import the server's modules (`consent`, `explain` and the other commands do not need them).
    aiohttp's __init__ imports its client with the server: serve uses the client only to download
    block lists and to send webhooks, so it is loaded then (~3 MiB less in a serving process)."""
    defer_init("aiohttp")
    import dnsgate.app.primary  # noqa: F401


def _listen_address(default_port: int | None) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            parse_host_port(text, default_port=default_port, listen=True)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
        return text
    return check


def _api_listen(text: str) -> str:
    try:
        parse_api_listen(text, key="--api")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
    return text


def _api_url(text: str) -> str:
    try:
        return api_base_url(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None


def _when(text: str) -> str:
    """A --since/--until, checked here (a usage error, exit 2) and read by the server the same way."""
    try:
        parse_when(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _client_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that calls the running server's admin API."""
    p.add_argument("--api", metavar="URL", type=_api_url,
                   help="the server's API to call, HOST:PORT (a host name or IP address) or "
                        "http(s)://HOST[:PORT][/PATH] (env DNSGATE_API; default: api.admin_listen, else "
                        "api.listen, of the config)")
    p.add_argument("--token", help="admin token (default: DNSGATE_ADMIN_TOKEN, api.admin_token, or "
                   "<data dir>/admin-token)")
    p.add_argument("--config", metavar="FILE", help="the server's TOML configuration (env DNSGATE_CONFIG)")
    p.add_argument("--data-dir", metavar="DIR", help="the server's data dir, for its admin token "
                   "(env DNSGATE_STORAGE_DATA_DIR; default: storage.data_dir of the config, ./data)")


def _upstream(text: str) -> str:
    try:
        parse_upstreams(text, bootstrap=None)  # the syntax: a name's addresses come from the config
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dnsgate", description="A consent-aware DNS resolver.")
    parser.add_argument("--version", action="version", version=f"dnsgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    serve = commands.add_parser("serve", help="run the DNS server and the consent API")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration (default: embedded defaults; "
                       "env DNSGATE_CONFIG)")
    serve.add_argument("--dns", metavar="HOST:PORT", action="append", type=_listen_address(None),
                       help="DNS listen address, UDP and TCP; repeatable; IPv6 as [::1]:5353 (env DNSGATE_DNS)")
    serve.add_argument("--api", metavar="HOST:PORT", type=_api_listen,
                       help="HTTP API listen address, also as http://HOST:PORT (env DNSGATE_API)")
    upstreams = serve.add_mutually_exclusive_group()
    upstreams.add_argument("--upstream", metavar="HOST[:PORT]", action="append", type=_upstream,
                           help="upstream resolver (also tcp://HOST[:PORT], tls://HOST[:PORT][#NAME], "
                                "https://NAME/PATH with upstream.bootstrap); repeatable "
                                "(env DNSGATE_UPSTREAM; default: /etc/resolv.conf)")
    upstreams.add_argument("--demo-upstream", action="store_true",
                           help="forward to a built-in upstream on loopback that answers every name with "
                                "documentation addresses (198.51.100.0/24, 2001:db8::/32): the tour without internet")
    serve.add_argument("--data-dir", metavar="DIR", help="where consent is stored (env DNSGATE_DATA_DIR)")
    serve.add_argument("--store", metavar="sqlite|URL", help="consent store: sqlite (in the data dir) or a Redis "
                       "URL shared by several instances, redis://host:6379/0 (env DNSGATE_STORE)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="log level (env DNSGATE_LOG_LEVEL; config log.level; default info)")
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="log lines as key=value text or JSON objects (env DNSGATE_LOG_FORMAT; config log.format)")
    serve.add_argument("--workers", metavar="N", help="processes answering DNS on the same addresses, for "
                       "machines with spare cores (env DNSGATE_WORKERS; config dns.workers; default 1)")
    observe_cli.add_commands(commands, _client_options, _when)
    health_cmd = commands.add_parser("health", help="exit 0 if the configured dnsgate answers on its API (/healthz) "
                                     "and DNS (the local.healthcheck name), else 1: for container and service checks")
    health_cmd.add_argument("--config", metavar="FILE", help="the server's TOML configuration (env DNSGATE_CONFIG)")
    health_cmd.add_argument("--api", metavar="HOST:PORT", type=_api_listen,
                            help="the API's listen address instead of the configured one (env DNSGATE_API)")
    health_cmd.add_argument("--dns", metavar="HOST:PORT", type=_listen_address(None),
                            help="the DNS address to probe instead of the configured first one (env DNSGATE_DNS)")
    health_cmd.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help="per check (default 2)")

    store = commands.add_parser("store", help="the consent store: copy it between SQLite and Redis, or acknowledge "
                                "that Redis lost its history")
    store_actions = store.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    migrate = store_actions.add_parser(
        "migrate", help="copy every choice, pairing and logged event into an empty store (stop dnsgate first)")
    migrate.add_argument("--from", dest="source", required=True, metavar="STORE",
                         help="sqlite:PATH (e.g. sqlite:data/consent.sqlite3) or redis://host:6379/0")
    migrate.add_argument("--to", dest="target", required=True, metavar="STORE", help="the same forms; must be empty")
    migrate.add_argument("--redis-prefix", default="dnsgate:", metavar="PREFIX",
                         help="key prefix in Redis (storage.redis_prefix; default dnsgate:)")
    migrate.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                         help="how long to wait for Redis per operation (default 10)")
    acknowledge = store_actions.add_parser(
        "acknowledge", help="the running server's /healthz stops reporting a lost consent history (talks to its "
                            "admin API)")

    config_cli.add_commands(commands, OneLineParser)

    consent = commands.add_parser("consent", help="list, show, grant, withdraw or export consent "
                                  "(talks to the running server's admin API)")
    actions = consent.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    listing = actions.add_parser("list", help="every device, address and network with a choice")
    show = actions.add_parser("show", help="one client's profile, choice and vendor decisions")
    show.add_argument("client", help="IP address, MAC address or network (CIDR)")
    grant = actions.add_parser("grant", help="record a choice for a client (as admin)")
    grant.add_argument("client", help="IP address, MAC address or network (CIDR)")
    grant.add_argument("categories", nargs="*", metavar="CATEGORY", help="categories to grant")
    grant.add_argument("--refuse", action="append", default=[], metavar="CATEGORY", help="a category to refuse")
    grant.add_argument("--vendor", action="append", default=[], metavar="VENDOR", help="a vendor to grant")
    grant.add_argument("--refuse-vendor", action="append", default=[], metavar="VENDOR", help="a vendor to refuse")
    grant.add_argument("--days", type=int, help="lifetime in days (default and most: the profile's)")
    withdraw = actions.add_parser("withdraw", help="withdraw a client's consent (every category refused)")
    withdraw.add_argument("client", help="IP address, MAC address or network (CIDR)")
    reset = actions.add_parser("reset", help="forget a client's choice (ends a kiosk session)")
    reset.add_argument("client", help="IP address, MAC address or network (CIDR)")
    paired = actions.add_parser("paired", help="grants an older dnsgate's pairing copied to another device, and "
                                "what became of them (they stop counting at the first start of this version)")
    export = actions.add_parser("export", help="the consent log as JSON Lines or CSV")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--since", metavar="TIME", type=_when,
                        help="ISO 8601 (UTC unless it says otherwise), UNIX seconds, or an age (15m, 2h, 7d)")
    export.add_argument("--until", metavar="TIME", type=_when, help="the same forms, exclusive")
    export.add_argument("--client", help="only this IP address, MAC address or network")
    export.add_argument("--output", "-o", metavar="FILE", help="write here instead of standard output")

    cert = commands.add_parser("cert", help="certificates for DNS over TLS and over HTTPS")
    cert_actions = cert.add_subparsers(dest="action", required=True, parser_class=OneLineParser)
    cert_init = cert_actions.add_parser(
        "init", help="make a private CA (to install on devices) and a server certificate for the resolver's "
                     "names and addresses")
    cert_init.add_argument("--name", action="append", default=[], metavar="NAME",
                           help="a name clients reach the resolver by, e.g. dns.home.arpa; repeatable")
    cert_init.add_argument("--ip", action="append", default=[], metavar="ADDR",
                           help="an address clients reach the resolver at, e.g. 192.168.1.2; repeatable "
                                "(DDR's verified discovery needs them in the certificate)")
    cert_init.add_argument("--dir", metavar="DIR", help="where to write ca.pem, ca.key, server.pem and server.key "
                           "(default: <data dir>/tls)")
    cert_init.add_argument("--data-dir", metavar="DIR", help="the server's data dir (env DNSGATE_DATA_DIR; "
                           "default: data)")
    cert_init.add_argument("--new-ca", action="store_true",
                           help="make a new CA even if the one in DIR covers the same names (devices need its "
                                "ca.pem again)")

    explain = commands.add_parser("explain", help="why a name resolves or not for a client")
    explain.add_argument("name", help="the domain name, e.g. trackcmp.net")
    explain.add_argument("--client", required=True, metavar="ADDR", help="the client's IP address")
    explain.add_argument("--mac", help="the client's MAC address, if it reaches dnsgate through a forwarder")

    for p in (listing, show, grant, withdraw, reset, paired, export, explain, acknowledge):
        _client_options(p)
        if p not in (export, acknowledge):
            p.add_argument("--json", action="store_true", help="print the API's JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "health":
        return health.run(args.config, args.api, args.dns, args.timeout)
    if args.command == "store" and args.action == "migrate":
        return store_command(args)
    if args.command == "config":
        return config_cli.run(args)
    if args.command == "cert":
        return cert_command(args)
    try:
        base_url = api_to_call(args.api, os.environ)
        client = AdminClient.for_config(_client_config(args), args.token, base_url)
        if args.command in ("log", "report"):
            return observe_cli.run(args, client)
        return _admin_command(args, client)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"dnsgate: error: {error}", file=sys.stderr)
        return 2
    except AdminError as exc:
        print(f"dnsgate: error: {exc}", file=sys.stderr)
        return 1


def _client_config(args: argparse.Namespace) -> Config:
    env_config, env_overrides = overrides_from_env(os.environ)
    # --api and DNSGATE_API name the URL to call (api_to_call), not where a server listens
    flags = Overrides(data_dir=args.data_dir)
    return load_config(args.config or env_config, merge_overrides(replace(env_overrides, api=None), flags))


def _admin_command(args: argparse.Namespace, client: AdminClient) -> int:
    if args.command == "explain":
        result = client.get("/v1/explain", {"name": args.name, "client": args.client, "mac": args.mac})
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{result['name']} for {args.client}: "
                  f"{'RESOLVED' if result['answer'] == 'resolve' else 'BLOCKED (sinkhole)'}")
            for reason in result["reasons"]:
                print(f"  - {reason}")
        return 0
    action = args.action
    if args.command == "store":  # acknowledge
        loss = client.post("/v1/store/acknowledge")["acknowledged"]
        print(f"acknowledged: the history loss of {loss['at']}: {loss['what']}" if loss
              else "nothing to acknowledge: no loss of the consent history is reported")
        return 0
    if action == "export":
        query = {"format": args.format, "since": args.since, "until": args.until, "client": args.client}
        if args.output:
            with open(args.output, "wb") as out:
                client.stream("/v1/audit/export", query, out)
        else:
            client.stream("/v1/audit/export", query, sys.stdout.buffer)
            sys.stdout.flush()
        return 0
    if action == "paired":
        events = [json.loads(line) for line in client.lines("/v1/audit/export", {"format": "jsonl"})]
        in_force = {v["choice"]["id"] for v in client.get("/v1/clients")["clients"] if v.get("choice")}
        if args.json:
            print(json.dumps([{**e, "in_force": e["id"] in in_force} for e in events
                              if e["action"] == "grant" and (e.get("reason") or "").startswith(PAIRED_GRANT)],
                             indent=2))
        else:
            for line in lines_of_copied_grants(events, in_force):
                print(line)
        return 0
    if action == "list":
        views = client.get("/v1/clients")["clients"]
        if args.json:
            print(json.dumps(views, indent=2))
            return 0
        for view in views:
            for line in lines_of_view(view):
                print(line)
            print()
        if not views:
            print("no choices recorded")
        return 0
    path = f"/v1/clients/{args.client}/consent"
    if action == "show":
        view = client.get(path)
    elif action == "grant":
        choices = {**{c: True for c in args.categories}, **{c: False for c in args.refuse}}
        vendors = {**{v: True for v in args.vendor}, **{v: False for v in args.refuse_vendor}}
        body: dict[str, object] = {"choices": choices}
        if vendors:
            body["vendors"] = vendors
        if args.days is not None:
            body["days"] = args.days
        view = client.put(path, body)
    elif action == "withdraw":
        view = client.delete(path)
    else:
        view = client.post(f"/v1/clients/{args.client}/session/end")
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        for line in lines_of_view(view):
            print(line)
    return 0


def serve(args: argparse.Namespace) -> int:
    env_config, env_overrides = overrides_from_env(os.environ)  # (its errors come with the file's)
    flags = Overrides(
        dns=tuple(args.dns) if args.dns else None,
        api=args.api,
        upstream=tuple(args.upstream) if args.upstream else None,
        data_dir=args.data_dir,
        store=args.store,
        log_level=args.log_level,
        log_format=args.log_format,
        workers=args.workers,
    )
    path, overrides = args.config or env_config, merge_overrides(env_overrides, flags)
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        from dnsgate.config_check import where

        # Every error, each on its line; the variable that set a bad value is named; a file's keep
        # the line tests and scripts know (`dnsgate config check` adds the file's line).
        for error in exc.errors:
            print(f"dnsgate: error: {where(error, None, os.environ, flags)}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level, cfg.log.format)

    load_server()
    from dnsgate.app.primary import StartupError, run
    from dnsgate.gc_policy import frozen_startup

    if hasattr(signal, "SIGXFSZ"):
        # A file size limit (ulimit -f) reached by a write fails that write (EFBIG: the consent store
        # answers 503, as on a full disk) instead of killing the process that answers DNS.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    async def main_task() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.ExitStack() as serving:
            def ready(running: Running) -> None:
                print(running.ready_line(), flush=True)
                serving.enter_context(frozen_startup())  # what start-up built stays out of GC passes

            # A reload (SIGHUP, POST /v1/reload) reads the same file, environment and flags again.
            if not args.demo_upstream:
                await run(cfg, stop, ready, reread=lambda: load_config(path, overrides))
                return
            from dnsgate.dns import demo_upstream

            demo, port = await demo_upstream.start("127.0.0.1")
            serving.callback(demo.close)
            print(f"dnsgate: --demo-upstream: every name is answered by the built-in upstream on 127.0.0.1:{port}, "
                  "with documentation addresses (198.51.100.0/24, 2001:db8::/32)", file=sys.stderr, flush=True)

            def with_demo(c: Config) -> Config:
                return replace(c, upstream=replace(c.upstream, servers=(f"127.0.0.1:{port}",)))

            await run(with_demo(cfg), stop, ready, reread=lambda: with_demo(load_config(path, overrides)))

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(main_task())
    except StartupError as exc:
        print(f"dnsgate: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cert_command(args: argparse.Namespace) -> int:
    """`dnsgate cert init --name NAME --ip ADDR [--dir DIR]`."""
    from pathlib import Path

    from dnsgate.cli.cert import CertError, init, summary

    directory = Path(args.dir) if args.dir else \
        Path(args.data_dir or os.environ.get("DNSGATE_DATA_DIR") or "data") / "tls"
    try:
        issued = init(directory, args.name, args.ip, new_ca=args.new_ca)
    except CertError as exc:
        print(f"dnsgate: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dnsgate: error: {directory}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(summary(issued))
    return 0


def store_command(args: argparse.Namespace) -> int:
    """`dnsgate store migrate --from STORE --to STORE`."""
    from dnsgate.consent.migrate import BadStore, MigrationError, migrate, open_store

    async def run() -> str:
        source = open_store(args.source, "--from", prefix=args.redis_prefix, timeout=args.timeout, must_exist=True)
        try:
            target = open_store(args.target, "--to", prefix=args.redis_prefix, timeout=args.timeout,
                                must_exist=False)
            try:
                copied = await migrate(source, target)
            finally:
                await target.close()
        finally:
            await source.close()
        return (f"copied {copied.events} events, {copied.choices} choices and {copied.pairings} pairings "
                f"from {source.name} to {target.name}; the copy's log exports exactly as the original's")

    if args.source == args.target:
        print("dnsgate: error: --from and --to name the same store", file=sys.stderr)
        return 2
    try:
        print(asyncio.run(run()))
    except MigrationError as exc:
        print(f"dnsgate: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, BadStore) else 1
    return 0
