"""Per-client rate limit for public deployments: at most N generation requests per sliding minute.

Pure and thread-safe; the UI, its gradio_client API and /v1 share one `ClientRateLimit`, so a client's
budget is the same whichever door it knocks on. Memory is bounded: idle clients are forgotten.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from backend.errors import RateLimited

FORWARDED_FOR = "x-forwarded-for"


class SlidingWindowLimiter:
    """At most `max_requests` admissions per `window` seconds for each key (a sliding-window log)."""

    def __init__(
        self,
        max_requests: int,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 100_000,
    ):
        if max_requests < 1:
            raise ValueError(f"max_requests must be at least 1, got {max_requests}")
        self.max_requests, self.window, self.max_clients = max_requests, window, max_clients
        self._clock = clock
        self._lock = threading.Lock()
        # Least recently admitted first, so idle clients are found at the front.
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def wait(self, key: str) -> float:
        """Admit `key` and return 0, or return the seconds until it may try again (nothing is counted)."""
        with self._lock:
            now = self._clock()
            self._forget_idle(now)
            times = self._times.get(key)
            if times is None:
                times = self._times[key] = deque()
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.max_requests:
                return times[0] + self.window - now
            times.append(now)
            self._times.move_to_end(key)
            while len(self._times) > self.max_clients:  # a flood of addresses: drop the longest idle
                self._times.popitem(last=False)
            return 0.0

    def _forget_idle(self, now: float) -> None:
        while self._times:
            key, times = next(iter(self._times.items()))
            if times and times[-1] > now - self.window:
                return
            del self._times[key]

    def __len__(self) -> int:
        """Clients remembered now."""
        return len(self._times)


def client_key(host: str | None, forwarded_for: str | None, trust_proxy_headers: bool) -> str:
    """Who is asking: the connection's peer, or behind a trusted proxy (a Space) the first
    X-Forwarded-For hop. Never the header unless trusted: anyone can send it."""
    if trust_proxy_headers and forwarded_for:
        first = forwarded_for.split(",")[0].strip()
        if first:
            return first
    return host or "unknown"


class ClientRateLimit:
    """`--rate-limit N`: N requests per minute per client; `admit(request)` raises RateLimited beyond."""

    def __init__(
        self,
        per_minute: int,
        trust_proxy_headers: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_minute = per_minute
        self.trust_proxy_headers = trust_proxy_headers
        self.limiter = SlidingWindowLimiter(per_minute, 60.0, clock)

    def key(self, request) -> str:
        """`request`: a Starlette or Gradio request (both have .client and .headers); None is local."""
        if request is None:
            return "local"
        client = getattr(request, "client", None)
        headers = getattr(request, "headers", None) or {}
        return client_key(getattr(client, "host", None), headers.get(FORWARDED_FOR), self.trust_proxy_headers)

    def admit(self, request) -> None:
        seconds = self.limiter.wait(self.key(request))
        if seconds > 0:
            raise RateLimited(self.per_minute, math.ceil(seconds))


def rate_limit_for(per_minute: int, trust_proxy_headers: bool = False) -> ClientRateLimit | None:
    """The limit `--rate-limit` asks for; None when it is off (0)."""
    return ClientRateLimit(per_minute, trust_proxy_headers) if per_minute > 0 else None
