"""The wheel as a user gets it: built from this checkout, installed in a fresh virtual environment,
started with `dnsgate serve` on loopback ports and asked with dig. Run by .ci/run (not by pytest: it
builds and installs, which takes a minute).

    python3 tests/install_wheel.py [--keep]     (from the checkout)

Checks that every file under dnsgate/data/ is in the wheel (the catalog, the notice, the portal's
and dashboard's assets, the portal's languages), that the installed program answers a local name,
a name forwarded to an upstream (a stub on loopback, started here), and sinkholes a vendor of the
built-in catalog, that the portal page and the dashboard are served from the installed files, and
that `dnsgate health` agrees. dnsgate runs from a directory outside the checkout, so the checkout's
sources cannot stand in for the installed ones. Every step has a deadline; the server is stopped by
its PID. Standard library only: it runs before the test environment exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP_TIMEOUT = 300.0  # building or installing (dependencies come from the package index)
START_TIMEOUT = 30.0
STUB_ADDRESS = bytes([192, 0, 2, 53])


def log(text: str) -> None:
    print(f"install_wheel: {text}", flush=True)


def run(*argv: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = STEP_TIMEOUT) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"install_wheel: {' '.join(map(str, argv))} failed ({done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")
    return done.stdout


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_ports() -> tuple[int, int]:
    """A port free for UDP and TCP (DNS), and one for the API."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port, free_port(socket.SOCK_STREAM)
    raise SystemExit("install_wheel: no free loopback port")


class StubUpstream(threading.Thread):
    """Answers every A question with 192.0.2.53 (TTL 60), anything else NODATA: enough to show a
    forwarded answer."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < 17:
                continue
            end = 12
            while end < len(data) and data[end]:
                end += data[end] + 1
            question = data[12:end + 5]
            qtype = struct.unpack_from(">H", question, len(question) - 4)[0]
            answers = b""
            if qtype == 1:
                answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + STUB_ADDRESS
            head = struct.pack(">HHHHHH", int.from_bytes(data[:2], "big"), 0x8180, 1, 1 if answers else 0, 0, 0)
            self.sock.sendto(head + question + answers, peer)

    def stop(self) -> None:
        self.stopped.set()
        self.join(2)
        self.sock.close()


def dig(port: int, *args: str) -> str:
    return run("dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=2", *args, timeout=20)


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read().decode("utf-8", "replace")


def check_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = ROOT / "dnsgate" / "data"
    expected = sorted(str(p.relative_to(ROOT)) for p in data.rglob("*") if p.is_file())
    missing = [name for name in expected if name not in names]
    if missing:
        raise SystemExit(f"install_wheel: the wheel lacks package data: {', '.join(missing)}")
    log(f"{wheel.name}: all {len(expected)} files of dnsgate/data are in it")


def expect(what: str, ok: bool, detail: str) -> None:
    if not ok:
        raise SystemExit(f"install_wheel: {what}: {detail}")
    log(f"ok: {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if shutil.which("dig") is None:
        raise SystemExit("install_wheel: dig is not installed (Debian package bind9-dnsutils)")
    work = Path(tempfile.mkdtemp(prefix="dnsgate-wheel-"))
    try:
        return check(work)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def check(work: Path) -> int:
    started = time.monotonic()
    dist = work / "dist"
    # Built from a copy of the sources: setuptools keeps a build/ folder beside them, and files of it
    # that the sources no longer have (a module moved away) would go into the wheel.
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "dnsgate", src / "dnsgate", ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, src)
    wheels = list(dist.glob("dnsgate-*.whl"))
    expect("one wheel built", len(wheels) == 1, str(wheels))
    check_wheel_contents(wheels[0])

    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheels[0])
    where = run(venv / "bin" / "python", "-c", "import dnsgate; print(dnsgate.__file__)", cwd=work).strip()
    expect("dnsgate imports from the venv", where.startswith(str(venv)), where)
    log(f"built and installed in {time.monotonic() - started:.0f} s")

    dns_port, api_port = free_ports()
    stub = StubUpstream()
    stub.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DNSGATE_", "PYTHON"))}
    env.update(DNSGATE_DNS=f"127.0.0.1:{dns_port}", DNSGATE_API=f"127.0.0.1:{api_port}",
               DNSGATE_UPSTREAM=f"127.0.0.1:{stub.port}", DNSGATE_DATA_DIR=str(work / "data"))
    server = subprocess.Popen([str(venv / "bin" / "dnsgate"), "serve"], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                output = server.stdout.read() if server.stdout else ""
                raise SystemExit(f"install_wheel: dnsgate serve exited with {server.returncode}:\n{output}")
            try:
                if http_get(f"{api}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"install_wheel: dnsgate serve did not answer /healthz in {START_TIMEOUT:.0f} s")
            time.sleep(0.2)
        log(f"dnsgate serve (pid {server.pid}) answers on DNS 127.0.0.1:{dns_port}, API {api}")

        local = dig(dns_port, "healthcheck.dnsgate.internal", "A", "+short").split()
        expect("dig gets the local health name", local == ["127.0.0.1"], str(local))
        forwarded = dig(dns_port, "www.example.test", "A", "+short").split()
        expect("dig gets a forwarded answer from the upstream", forwarded == ["192.0.2.53"], str(forwarded))
        gated = dig(dns_port, "trackcmp.net", "A")
        expect("the built-in catalog gates a vendor (NXDOMAIN)", "status: NXDOMAIN" in gated, gated)

        status, page = http_get(f"{api}/", {"Accept-Language": "de"})
        expect("the portal page is served in German (lang files installed)",
               status == 200 and 'lang="de"' in page, f"{status} {page[:200]!r}")
        status, script = http_get(f"{api}/portal/app.js")
        expect("the portal's script is served", status == 200 and len(script) > 100, f"{status}")
        status, board = http_get(f"{api}/dashboard")
        expect("the dashboard page is served", status == 200 and "<html" in board.lower(), f"{status}")

        health = subprocess.run([str(venv / "bin" / "dnsgate"), "health"], cwd=work, env=env,
                                capture_output=True, text=True, timeout=20, check=False)
        expect("dnsgate health says healthy", health.returncode == 0, health.stdout + health.stderr)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)
        stub.stop()
    expect("dnsgate serve stopped on SIGTERM", server.returncode == 0, f"exit status {server.returncode}")
    log(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
