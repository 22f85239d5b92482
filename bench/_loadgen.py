"""Load generators shared by the HTTP benchmarks in ``bench/`` (not a benchmark itself).

* :func:`run_wrk` — ``wrk -t 1 -c N -d Ds --latency`` (``apt-get install -y wrk``), with an
  optional Lua script (:func:`write_wrk_script`) for a request method, body and headers;
* :func:`run_httpx` — the fallback: an asyncio + httpx generator in a child process (this file
  run as a script), one AsyncClient (one keep-alive connection) per concurrent client;
* :func:`choose` — resolve ``--loadgen auto|wrk|httpx``.

Both return a dict: ``rps``, ``requests``, ``p50`` and ``p99`` (ms), ``non2xx``, ``socket_errors``.
wrk is cheap (a few us of CPU per request); httpx costs ~1-2 ms of CPU per request, so with it the
load generator is often the bottleneck on a small machine and ratios are compressed toward 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ServerError, percentile  # noqa: E402

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def choose(loadgen: str) -> str:
    """``auto`` -> ``wrk`` when installed, else ``httpx``; ``wrk`` without wrk falls back too."""
    if loadgen == "auto":
        return "wrk" if shutil.which("wrk") else "httpx"
    if loadgen == "wrk" and not shutil.which("wrk"):
        print("wrk is not installed (apt-get install -y wrk); using the httpx load generator", file=sys.stderr)
        return "httpx"
    return loadgen


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def _lua_string(s: str) -> str:
    """A double-quoted Lua string literal for ``s`` (control characters and non-ASCII as ``\\ddd`` bytes)."""
    out = []
    for byte in s.encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def write_wrk_script(path: Path, *, method: str = "GET", body: bytes | None = None,
                     headers: dict[str, str] | None = None) -> Path:
    """A wrk Lua script sending every request with ``method``, ``body`` and ``headers``."""
    lines = [f"wrk.method = {_lua_string(method)}"]
    if body is not None:
        lines.append(f"wrk.body = {_lua_string(body.decode('utf-8'))}")
    for name, value in (headers or {}).items():
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_wrk(url: str, key: str, connections: int, duration: float, *, script: Path | None = None) -> dict[str, Any]:
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration:g}s", "--latency", "--timeout", "10s",
           "-H", f"X-API-Key: {key}"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, start_new_session=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise ServerError(f"wrk failed ({out.returncode}):\n{text}")
    res: dict[str, Any] = {"raw": text}
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    res["rps"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", text)
    res["requests"] = int(m.group(1)) if m else 0
    for p in ("50", "99"):
        m = re.search(rf"^\s*{p}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        res[f"p{p}"] = _ms(m.group(1), m.group(2)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    res["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    return res


async def _httpx_load(url: str, key: str, connections: int, duration: float, method: str = "GET",
                      body: bytes | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    # one client (one keep-alive connection) per worker: a single pooled AsyncClient shared by
    # 64 tasks spends most of its time in the pool's bookkeeping and collapses to a few dozen req/s
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    h = {"X-API-Key": key, **(headers or {})}
    clients = [httpx.AsyncClient(limits=limits, timeout=10.0, headers=h) for _ in range(connections)]
    start = time.perf_counter()
    deadline = start + duration

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        async with client:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    r = await client.request(method, url, content=body)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - start
    n = len(latencies)
    return {
        "rps": n / elapsed, "requests": n, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
        "non2xx": sum(c for s, c in statuses.items() if not 200 <= s < 400), "socket_errors": errors,
        "statuses": statuses,
    }


def run_httpx(url: str, key: str, connections: int, duration: float, *, method: str = "GET",
              body_file: Path | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``_httpx_load`` in a child process (so it does not share the benchmark's GIL)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), url, "--key", key, "--connections", str(connections),
           "--duration", str(duration), "--method", method]
    if body_file is not None:
        cmd += ["--body-file", str(body_file)]
    for name, value in (headers or {}).items():
        cmd += ["--header", f"{name}: {value}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, start_new_session=True)
    if out.returncode != 0:
        raise ServerError(f"httpx load generator failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the httpx load generator (used by the benchmarks)")
    p.add_argument("url")
    p.add_argument("--key", default="")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--method", default="GET")
    p.add_argument("--body-file")
    p.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    args = p.parse_args(argv)
    body = Path(args.body_file).read_bytes() if args.body_file else None
    headers = dict(h.split(": ", 1) for h in args.header)
    res = asyncio.run(_httpx_load(args.url, args.key, args.connections, args.duration, args.method, body, headers))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
