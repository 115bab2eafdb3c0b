"""What the serving process loads at start: libraries it needs only for rare packets or for other
commands stay out of it (each costs MiB of memory in every running dnsgate)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dnsgate.cli.cert import init

PROBE = """
import json, sys
from pathlib import Path
import dnsgate.app.primary, dnsgate.app.worker, dnsgate.cli.main
from dnsgate.dns.tls import TlsFiles
tls = TlsFiles(Path(sys.argv[1]), Path(sys.argv[2]))
tls.load()
print(json.dumps({"first_name": tls.first_name, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_serving_with_encrypted_dns_loads_neither_cryptography_nor_dnslib(tmp_path: Path) -> None:
    issued = init(tmp_path / "tls", ["dns.example.test"], ["127.0.0.1"])
    out = subprocess.run([sys.executable, "-c", PROBE, str(issued.cert_file), str(issued.key_file)],
                         capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["first_name"] == "dns.example.test"
    assert "aiohttp" in seen["modules"]  # the probe did load the serving process's modules
    assert "cryptography" not in seen["modules"]
    assert "dnslib" not in seen["modules"]
