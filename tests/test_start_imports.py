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
cfg = Config()
build_upstreams(cfg, [parse_upstream("192.0.2.1:53"), parse_upstream("tls://192.0.2.2")])
plain = sorted(sys.modules)
build_upstreams(cfg, [parse_upstream("https://192.0.2.3/dns-query")])
print(json.dumps({"plain": plain, "doh": sorted(sys.modules)}))
"""


def test_http2_is_loaded_only_with_a_dns_over_https_upstream_or_listener() -> None:
    """h2 (with hpack and hyperframe, ~1.3 MiB) serves DNS over HTTPS only: the primary without a DoH
    listener and every worker (none has one) load it only when an https:// upstream is configured."""
    out = subprocess.run([sys.executable, "-c", HTTP2_PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert "dnsgate.dns.upstreams" in seen["plain"]  # the probe did load the forwarding side
    assert not {m.split(".")[0] for m in seen["plain"]} & {"h2", "hpack", "hyperframe"}
    assert "dnsgate.dns.https_listener" not in seen["plain"]
    assert {"h2.connection", "dnsgate.dns.doh_upstream"} <= set(seen["doh"])  # and then it is there
