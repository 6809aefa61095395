"""Size each model's KV pool from the memory its placed weights leave.

Placement reserves one full-context request's KV cache per model (and room for one prefill), so every
placed model can serve at least one request. Once both models are placed, what the budgets leave on the
devices that hold a model's KV cache grows that model's pool, up to --max-batch-size full-context
requests. A model's cache sits beside its GPU layers; the cache of its offloaded layers (CPU or disk)
sits on its first GPU, where accelerate runs them; a model on no GPU keeps all of it in RAM.

Two models whose caches share a device get the same fraction of the way from one request to their cap
(progressive filling): with one --max-batch-size both reach the same concurrency, and room a model cannot
use (its tightest device is full, or it reached its cap) goes on to the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from backend.placement.plans import Device, KVPool


@dataclass(frozen=True)
class KVNeed:
    context: int  # tokens of one full-context request: already reserved during placement
    cap: int  # tokens of --max-batch-size full-context requests: the pool never grows beyond
    token_bytes: dict[Device, int]  # KV bytes one token takes on each device that holds this model's cache

    def pool(self, tokens: int) -> KVPool:
        return KVPool(tokens, tokens * sum(self.token_bytes.values()), self.context)

    def extra_bytes(self, tokens: int) -> dict[Device, int]:
        """Bytes beyond the one reserved request, per device, for a pool of `tokens`."""
        return {d: (tokens - self.context) * n for d, n in self.token_bytes.items()}


def kv_need(
    kv_bytes: Sequence[int], places: Sequence[Device], loose_kv: int, context: int, batch_size: int
) -> KVNeed:
    """Where a placed model's cache lives, per token: `kv_bytes` is one request's share of each unit (at
    `context` tokens), `places` the units' devices, `loose_kv` the cache of layers not found among them."""
    main: Device = next((p for p in places if isinstance(p, int)), "cpu")  # where offloaded layers run
    one_request: dict[Device, int] = {}
    for kv, place in zip(kv_bytes, places, strict=True):
        home = place if isinstance(place, int) else main
        one_request[home] = one_request.get(home, 0) + kv
    one_request[main] = one_request.get(main, 0) + loose_kv
    # Exact: one request's cache is (bytes per token of a layer) x context x layers.
    token_bytes = {d: n // context for d, n in one_request.items() if n}
    return KVNeed(context, max(batch_size, 1) * context, token_bytes)


def size_pools(needs: dict[str, KVNeed], free: dict[Device, int]) -> dict[str, KVPool]:
    """Each model's pool: one request plus its share of what is `free` on its devices, up to its cap.

    Progressive filling in exact fractions: every model still growing takes the same fraction of its
    want (cap - one request) until a device it uses is full or it reaches its cap; then the others go on.
    """
    want = {role: need.cap - need.context for role, need in needs.items()}
    granted = {role: Fraction(0) for role in needs}
    left = {d: Fraction(max(n, 0)) for d, n in free.items()}
    growing = {role for role, need in needs.items() if want[role] > 0 and need.token_bytes}
    while growing:
        rates: dict[Device, int] = {}  # bytes taken on each device per unit of fraction granted
        for role in growing:
            for d, n in needs[role].token_bytes.items():
                rates[d] = rates.get(d, 0) + want[role] * n
        step = min(1 - granted[role] for role in growing)
        step = min([step, *(left.get(d, Fraction(0)) / rate for d, rate in rates.items())])
        for role in growing:
            granted[role] += step
        for d, rate in rates.items():
            left[d] = left.get(d, Fraction(0)) - step * rate
        full = {d for d in rates if left[d] <= 0}
        growing = {r for r in growing if granted[r] < 1 and not full & set(needs[r].token_bytes)}
    return {
        role: need.pool(need.context + math.floor(granted[role] * want[role])) for role, need in needs.items()
    }
