"""What the serving process loads at start: libraries it needs only for rare packets or for other
commands stay out of it (each costs MiB of memory in every running dnsgate)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from dnsgate.cli.cert import init

PROBE = """
import json, sys
from pathlib import Path
import dnsgate.cli.main
dnsgate.cli.main.load_server()  # as serve does
import dnsgate.app.worker
from dnsgate.consent.sqlite_store import ConsentStore
from dnsgate.dns.tls import TlsFiles
from dnsgate.observe.querylog_db import QueryLogDb
tls = TlsFiles(Path(sys.argv[1]), Path(sys.argv[2]))
tls.load()
ConsentStore(Path(sys.argv[3]) / "consent.db")  # the SQLite files serve opens
QueryLogDb(Path(sys.argv[3]) / "queries.db")
loaded = sorted(sys.modules)
import sqlite_utils.recipes
import aiohttp
print(json.dumps({"first_name": tls.first_name, "modules": sorted({m.split(".")[0] for m in loaded}), "loaded": loaded,
                  "parsed": sqlite_utils.recipes.parsedate("5 Jan 2021"), "client": aiohttp.ClientSession.__module__,
                  "version": aiohttp.__version__}))
"""


def test_serving_with_encrypted_dns_loads_neither_cryptography_nor_dnslib(tmp_path: Path) -> None:
    issued = init(tmp_path / "tls", ["dns.example.test"], ["127.0.0.1"])
    out = subprocess.run([sys.executable, "-c", PROBE, str(issued.cert_file), str(issued.key_file), str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["first_name"] == "dns.example.test"
    assert "aiohttp" in seen["modules"]  # the probe did load the serving process's modules
    assert "cryptography" not in seen["modules"]
    assert "dnslib" not in seen["modules"]


def test_serving_loads_neither_the_date_parser_nor_the_plugins_of_sqlite_utils(tmp_path: Path) -> None:
    """sqlite-utils imports python-dateutil's parser for a recipe and scans every installed package
    for plugins when a database is opened: serve needs neither."""
    issued = init(tmp_path / "tls", ["dns.example.test"], ["127.0.0.1"])
    out = subprocess.run([sys.executable, "-c", PROBE, str(issued.cert_file), str(issued.key_file), str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert "sqlite_utils" in seen["modules"]
    assert "dateutil.parser._parser" not in seen["loaded"]  # the parser's code
    assert "importlib.metadata" not in seen["loaded"]  # what the plugin scan reads installed packages with
    assert seen["parsed"] == "2021-01-05"  # a caller that does use the parser gets it


def test_serving_loads_aiohttp_s_server_without_its_client(tmp_path: Path) -> None:
    """aiohttp's __init__ imports the client with the server; serve downloads lists and sends
    webhooks with it, so it is loaded when first used."""
    issued = init(tmp_path / "tls", ["dns.example.test"], ["127.0.0.1"])
    out = subprocess.run([sys.executable, "-c", PROBE, str(issued.cert_file), str(issued.key_file), str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert "aiohttp.web" in seen["loaded"]
    assert "aiohttp.client" not in seen["loaded"]
    assert "aiohttp.connector" not in seen["loaded"]
    assert seen["client"] == "aiohttp.client"  # a caller that does use the client gets it
    assert seen["version"] == metadata.version("aiohttp")


def test_serving_loads_neither_the_close_match_finder_nor_the_xml_writer(tmp_path: Path) -> None:
    """difflib only suggests a key for a configuration error, xml only writes a report as JUnit."""
    issued = init(tmp_path / "tls", ["dns.example.test"], ["127.0.0.1"])
    out = subprocess.run([sys.executable, "-c", PROBE, str(issued.cert_file), str(issued.key_file), str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert "difflib" not in seen["modules"]
    assert "xml" not in seen["modules"]


HTTP2_PROBE = """
import json, sys
import dnsgate.cli.main
dnsgate.cli.main.load_server()  # as serve does
import dnsgate.app.primary, dnsgate.app.worker
from dnsgate.app.dns_side import build_upstreams
from dnsgate.config import Config, parse_upstream

def loaded():  # (a deferred module's placeholder is in sys.modules before its code has run)
    return sorted(n for n, m in sys.modules.items() if type(m).__name__ != "_LazyModule")

cfg = Config()
build_upstreams(cfg, [parse_upstream("192.0.2.1:53"), parse_upstream("tls://192.0.2.2")])
plain = loaded()
import dnsgate.dns.https_listener as listener
with_listener = loaded()
listener.h2_connection.H2Connection()  # as the first client that negotiates HTTP/2 makes it
first_client = loaded()
print(json.dumps({"plain": plain, "listener": with_listener, "first_client": first_client}))
"""

DOH_UPSTREAM_PROBE = """
import json, sys
import dnsgate.cli.main
dnsgate.cli.main.load_server()
from dnsgate.app.dns_side import build_upstreams
from dnsgate.config import Config, parse_upstream
build_upstreams(Config(), [parse_upstream("https://192.0.2.3/dns-query")])
print(json.dumps(sorted(n for n, m in sys.modules.items() if type(m).__name__ != "_LazyModule")))
"""

HTTP2 = {"h2.connection", "h2.events", "hpack", "hyperframe"}


def test_http2_is_loaded_only_with_a_dns_over_https_upstream_or_client() -> None:
    """h2 (with hpack and hyperframe, ~1.2 MiB) serves DNS over HTTPS only: a process loads it for an
    https:// upstream, or when the first client of its DoH listener negotiates HTTP/2; a DoH listener
    no client has used that way holds only its own module."""
    out = subprocess.run([sys.executable, "-c", HTTP2_PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert "dnsgate.dns.upstreams" in seen["plain"]  # the probe did load the forwarding side
    assert not HTTP2 & set(seen["plain"])
    assert "dnsgate.dns.https_listener" not in seen["plain"]
    assert "dnsgate.dns.https_listener" in seen["listener"]
    assert not HTTP2 & set(seen["listener"])
    assert set(seen["first_client"]) >= HTTP2  # and then it is there
    out = subprocess.run([sys.executable, "-c", DOH_UPSTREAM_PROBE], capture_output=True, text=True, timeout=60,
                         check=True)
    assert {"dnsgate.dns.doh_upstream", *HTTP2} <= set(json.loads(out.stdout))
