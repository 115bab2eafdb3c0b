"""Command line: `dnsgate serve` and friends. Errors are one line naming the culprit, exit status 2
for bad input (flags, config) and 1 for a failure to start (a port in use, say)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from . import __version__, observe_cli
from .app import Running, StartupError, run
from .config import ConfigError, Overrides, load_config, merge_overrides, overrides_from_env, parse_host_port
from .logs import setup_logging


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"dnsgate: error: {message} (see 'dnsgate {self.prog.split()[-1]} --help')\n")


def _address(default_port: int | None) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            parse_host_port(text, default_port=default_port)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
        return text
    return check


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dnsgate", description="A consent-aware DNS resolver.")
    parser.add_argument("--version", action="version", version=f"dnsgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    serve = commands.add_parser("serve", help="run the DNS server and the consent API")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration (default: embedded defaults; "
                       "env DNSGATE_CONFIG)")
    serve.add_argument("--dns", metavar="HOST:PORT", action="append", type=_address(None),
                       help="DNS listen address, UDP and TCP; repeatable; IPv6 as [::1]:5353 (env DNSGATE_DNS)")
    serve.add_argument("--api", metavar="HOST:PORT", type=_address(None),
                       help="HTTP API listen address (env DNSGATE_API)")
    serve.add_argument("--upstream", metavar="HOST[:PORT]", action="append", type=_address(53),
                       help="upstream resolver; repeatable (env DNSGATE_UPSTREAM; default: /etc/resolv.conf)")
    serve.add_argument("--data-dir", metavar="DIR", help="where consent is stored (env DNSGATE_DATA_DIR)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="log level (env DNSGATE_LOG_LEVEL; config log.level; default info)")
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="log lines as key=value text or JSON objects (env DNSGATE_LOG_FORMAT; config log.format)")
    observe_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return observe_cli.run(args)


def serve(args: argparse.Namespace) -> int:
    env_config, env_overrides = overrides_from_env(os.environ)
    flags = Overrides(
        dns=tuple(args.dns) if args.dns else None,
        api=args.api,
        upstream=tuple(args.upstream) if args.upstream else None,
        data_dir=args.data_dir,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    path, overrides = args.config or env_config, merge_overrides(env_overrides, flags)
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        print(f"dnsgate: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log.level, cfg.log.format)

    def ready(running: Running) -> None:
        print(running.ready_line(), flush=True)

    async def main_task() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # A reload (SIGHUP, POST /v1/reload) reads the same file, environment and flags again.
        await run(cfg, stop, ready, reread=lambda: load_config(path, overrides))

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main_task())
    except StartupError as exc:
        print(f"dnsgate: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
