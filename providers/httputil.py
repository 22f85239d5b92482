"""HTTP plumbing the vendor adapters share: retrying idempotent calls, streaming a result file to
disk under a size cap, ``Retry-After``, and telling a vendor's transient failures from final ones.

Everything here raises only the ``ProviderError`` tree (``providers.base``); ``name`` is the
provider's name, used in messages.
"""

from __future__ import annotations

import email.utils
import itertools
import os
import re
import time
from pathlib import Path
from typing import Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx

from providers.base import ProviderError, ProviderRejected, ProviderTimeout, ProviderUnavailable

T = TypeVar("T")
CHUNK = 256 * 1024

#: a vendor's failure message that reads like the vendor's own trouble, not the request's: another
#: try may succeed. Anything else (a bad dataset, a refused prompt) would fail the same way again.
TRANSIENT = re.compile(
    r"time[ -]?out|timed out|internal|server error|unavailable|capacity|overload|busy|out of memory|\boom\b"
    r"|cuda|gpu|network|connection|try again|temporar|interrupted|preempt|worker (?:died|lost|crash)",
    re.IGNORECASE,
)


def transient(message: str | None) -> bool:
    return bool(TRANSIENT.search(message or ""))


def clip(text: str | None, n: int = 200) -> str:
    """One line of at most ``n`` characters (control characters folded), for messages and logs."""
    return re.sub(r"[\x00-\x1f]+", " ", text or "").strip()[:n]


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None if absent or unreadable."""
    try:
        return max(0.0, float(value or ""))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value or "").timestamp() - time.time())
    except (TypeError, ValueError):
        return None


async def retrying(call: Callable[[], Awaitable[T]], *, name: str, what: str, retries: int, backoff_s: float,
                   sleep: Callable[[float], Awaitable[None]]) -> T:
    """Run an idempotent call, retrying transport errors and ProviderUnavailable ``retries``
    times with doubling backoff; then ProviderTimeout / ProviderUnavailable."""
    for attempt in itertools.count():
        try:
            return await call()
        except (httpx.TransportError, ProviderUnavailable) as e:
            if attempt >= retries:
                if isinstance(e, ProviderError):
                    raise
                cls = ProviderTimeout if isinstance(e, httpx.TimeoutException) else ProviderUnavailable
                raise cls(f"{name}: {what}: {type(e).__name__} after {attempt + 1} tries") from None
            await sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


async def download(client: httpx.AsyncClient, url: str, dest: Path, *, max_bytes: int, name: str, retries: int,
                   backoff_s: float, sleep: Callable[[float], Awaitable[None]],
                   check: Callable[[Path], None] | None = None) -> None:
    """Stream ``url`` to ``dest`` (atomically, through a ``.part`` file), capped at ``max_bytes``.
    Transport errors and 5xx are retried; ``check(path)`` (blocking, in a thread) may refuse the
    file by raising ProviderError. No partial file is left behind."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ProviderRejected(f"{name}: cannot fetch a {urlsplit(url).scheme!r} URL")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.part")

    async def once() -> None:
        async with client.stream("GET", url) as resp:
            if resp.status_code >= 500:
                raise ProviderUnavailable(f"{name}: download: HTTP {resp.status_code}")
            if resp.status_code != 200:
                raise ProviderError(f"{name}: download refused (HTTP {resp.status_code}; expired URL?)",
                                    retryable=resp.status_code in (408, 429))
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ProviderError(f"{name}: file is {declared} bytes, limit {max_bytes}", retryable=True)
            total = 0
            async with await anyio.open_file(tmp, "wb") as f:
                async for chunk in resp.aiter_bytes(CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise ProviderError(f"{name}: file passed the {max_bytes}-byte limit", retryable=True)
                    await f.write(chunk)

    try:
        await retrying(once, name=name, what="download", retries=retries, backoff_s=backoff_s, sleep=sleep)
        if check is not None:
            await anyio.to_thread.run_sync(check, tmp)
        await anyio.to_thread.run_sync(os.replace, tmp, dest)
    finally:
        await anyio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))
