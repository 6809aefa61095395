"""The batch's KV cache: each request keeps its keys and values in buffers of its own; attention runs per row.

Our own, not transformers' DynamicCache, for two reasons. A shared left-padded cache makes a request's
attention depend on its neighbours (the padded length, the kernel's blocking for it), so a seed gave other
text in a batch than alone; here each row attends over exactly its own tokens, with shapes that depend on
that request alone. And a padded cache holds rows x the longest row; here a request holds what it
reserved, so the engine can admit requests by a KV budget (backend.decode.kv_budget).

The model writes through `BatchCache` (a transformers Cache) and reads through `row_attention`, an
attention function registered with transformers under ATTENTION; calls without a BatchCache (beam
search, the Inspector, an image's prefill) fall through to transformers' own SDPA attention.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from backend.models.row_kernels import DTYPES as ROW_KERNEL_DTYPES

ATTENTION = "playground_rows"


class RowKV:
    """One request's keys and values for every layer, room for `capacity` tokens (allocated per layer on
    first write, on that layer's device: a model split over GPUs keeps each layer's KV beside it)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._lengths: dict[int, int] = {}

    @property
    def length(self) -> int:
        """Tokens stored (those of the layer written last in a forward pass are counted once it is done)."""
        return min(self._lengths.values(), default=0)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add `keys`/`values` of shape [kv_heads, tokens, head_dim] after what `layer` holds."""
        if layer not in self._keys:
            shape = (keys.shape[0], self.capacity, keys.shape[-1])
            self._keys[layer] = torch.empty(shape, dtype=keys.dtype, device=keys.device)
            self._values[layer] = torch.empty(shape, dtype=values.dtype, device=values.device)
            self._lengths[layer] = 0
        start, count = self._lengths[layer], keys.shape[1]
        if start + count > self.capacity:
            raise RuntimeError(f"a request outgrew its reserved KV room ({self.capacity} tokens)")
        self._keys[layer][:, start : start + count] = keys
        self._values[layer][:, start : start + count] = values
        self._lengths[layer] = start + count

    def append_one(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's write: one token's `key`/`value` [kv_heads, head_dim] after what `layer` holds (its
        prefill made the room); returns the layer's keys and values so far, [kv_heads, tokens, head_dim]."""
        start = self._lengths[layer]
        if start >= self.capacity:
            raise RuntimeError(f"a request outgrew its reserved KV room ({self.capacity} tokens)")
        keys, values = self._keys[layer], self._values[layer]
        keys[:, start] = key
        values[:, start] = value
        self._lengths[layer] = start + 1
        return keys[:, : start + 1], values[:, : start + 1]

    def claim_one(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for one token after what `layer` holds, for a kernel that writes it there itself: the layer's
        buffers [kv_heads, capacity, head_dim] and its length with that token."""
        start = self._lengths[layer]
        if start >= self.capacity:
            raise RuntimeError(f"a request outgrew its reserved KV room ({self.capacity} tokens)")
        self._lengths[layer] = start + 1
        return self._keys[layer], self._values[layer], start + 1

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer` so far: [1, kv_heads, tokens, head_dim], no copy."""
        n = self._lengths[layer]
        return self._keys[layer][None, :, :n], self._values[layer][None, :, :n]

    def load(self, cache: DynamicCache) -> None:
        """Take over a one-row transformers cache (what an image's prefill returns)."""
        for layer, cached in enumerate(cache.layers):
            self.append(layer, cached.keys[0], cached.values[0])


class BatchCache(Cache):
    """What one forward pass writes into: batch row i goes to rows[i]; rows beyond len(rows) are padding."""

    def __init__(self, rows: list[RowKV]):
        super().__init__(layers=[])
        self.rows = rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        for row, keys, values in zip(self.rows, key_states, value_states, strict=False):
            row.append(layer_idx, keys, values)
        return key_states, value_states  # row_attention reads each row's own buffers instead

    # The model asks these to size a mask that row_attention does not use; keep that mask trivial.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_query_offset(self, layer_idx: int | None = None) -> int:
        return 0


def row_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    batch_cache: BatchCache | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    """Attention for each row over its own keys (query [batch, heads, q, dim]); padding rows give zeros."""
    if batch_cache is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, **kwargs,
        )  # fmt: skip
    outputs = []
    for index, row in enumerate(batch_cache.rows):
        keys, values = row.view(module.layer_idx)
        outputs.append(_attend(query[index : index + 1], keys, values, scaling, sliding_window, softcap))
    padding = query.shape[0] - len(outputs)
    if padding:
        outputs.append(query.new_zeros((padding, *query.shape[1:])))
    return torch.cat(outputs).transpose(1, 2).contiguous(), None


def _attend(query, keys, values, scaling, sliding_window, softcap) -> torch.Tensor:
    """One row: query [1, heads, q, dim] against its keys [1, kv_heads, n, dim]; the last q are causal."""
    q, n = query.shape[2], keys.shape[2]
    if q == 1 and sliding_window:
        keys, values = keys[:, :, -sliding_window:], values[:, :, -sliding_window:]
    mask = None
    if (q > 1 and (sliding_window or q < n)) or softcap is not None:
        positions = torch.arange(n - q, n, device=query.device)[:, None]
        seen = torch.arange(keys.shape[2], device=query.device)[None, :] + (n - keys.shape[2])
        mask = seen <= positions
        if sliding_window:
            mask &= seen > positions - sliding_window
    groups = query.shape[1] // keys.shape[1]
    if q == 1 and mask is None and softcap is None and query.device.type == "cpu" and query.dtype in REDUCED:
        return _one_query(query, keys, values, scaling, groups)
    if softcap is not None:  # SDPA has no softcap (Gemma 2): the same maths by hand
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.tanh(query @ keys.transpose(-1, -2) * scale / softcap) * softcap
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values
    return F.scaled_dot_product_attention(
        query,
        keys,
        values,
        attn_mask=mask,
        scale=scaling,
        is_causal=q > 1 and mask is None,
        enable_gqa=groups > 1,
    )


# Where _one_query pays: side by side on this 2-core CPU, an 8-row SmolLM2-135M step took 48.7 ms against
# SDPA's 58.0 in bfloat16 (1.19x), and 0.96-0.97x in float32, where SDPA stays.
REDUCED = (torch.bfloat16, torch.float16)


def _one_query(query, keys, values, scaling, groups: int) -> torch.Tensor:
    """A decode step's attention for one row on CPU: query [1, heads, 1, dim] over its keys [1, kv_heads, n,
    dim], computed in float32. Ours because SDPA's CPU flash kernel costs about 67 µs a call in bfloat16
    here for a few µs of work, and a step of 8 rows makes one call per row and layer (41% of the step
    for SmolLM2's shape). Shapes depend on the row's own length only, as with SDPA."""
    kv_heads, dim = keys.shape[1], query.shape[-1]
    scale = scaling if scaling is not None else dim**-0.5
    grouped = query.reshape(kv_heads, groups, dim).float() * scale  # query head h reads kv head h // groups
    out = grouped.new_empty((kv_heads, groups, dim))
    _decode_row(grouped, keys[0], values[0], out)
    return out.reshape(1, kv_heads * groups, 1, dim).to(query.dtype)


def decode_attention(
    rows: list[RowKV],
    layer: int,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
    attend_rows=None,
) -> torch.Tensor:
    """A decode step's attention for a batch, as the fused step (backend.decode.fused_step) calls it: query
    [batch, heads, dim] and this step's keys/values [batch, kv_heads, dim]. Row i appends its key and value
    to rows[i] and attends over that row's keys alone; rows beyond len(rows) are padding and give zeros.
    Returns [batch, heads * dim] in the query's dtype, computed in float32.

    Ours, beside _attend, because a step makes this call for every row and layer (240 for 8 rows of
    SmolLM2's shape): the query is scaled, widened and split once per layer for all rows, and a row costs
    its write and five operations. Side by side here, 8 rows x 30 layers, bfloat16: 11.3-13.2 ms a step
    against 14.3-18.3 through append, view and _attend.

    `attend_rows`, the row kernels' (backend.models.row_kernels), does the same for all rows in one call:
    the writes, and each row's float32 maths in its own order. 8 rows x 30 layers of SmolLM2's shape, side
    by side here: 128 keys a row, bfloat16 4.3-4.8 ms a step against 11.0-11.4, float32 6.6-7.3 against
    10.1-11.9; 1,024 keys, bfloat16 27.7-29.3 against 30.9-33.9."""
    batch, heads, dim = query.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    if attend_rows is not None and keys.dtype in ROW_KERNEL_DTYPES:
        claimed = [row.claim_one(layer) for row in rows]
        out = attend_rows(
            (query.float() * scale).contiguous(),
            keys.contiguous(),
            values.contiguous(),
            [claim[0] for claim in claimed],
            [claim[1] for claim in claimed],
            [claim[2] for claim in claimed],
            sliding_window or 0,
        )
        return out.view(batch, heads * dim).to(query.dtype)
    grouped = (query.float() * scale).view(batch, kv_heads, groups, dim).unbind(0)  # head h reads h // groups
    out = torch.zeros((batch, kv_heads, groups, dim), device=query.device)
    new_keys, new_values = keys.unbind(0), values.unbind(0)
    for index, row in enumerate(rows):
        row_keys, row_values = row.append_one(layer, new_keys[index], new_values[index])
        if sliding_window:
            row_keys, row_values = row_keys[:, -sliding_window:], row_values[:, -sliding_window:]
        _decode_row(grouped[index], row_keys, row_values, out[index])
    return out.view(batch, heads * dim).to(query.dtype)


def _decode_row(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    """One row: scaled float32 query [kv_heads, groups, dim] over its keys [kv_heads, n, dim], into `out`.
    Shapes depend on the row's own length only."""
    scores = torch.bmm(query, keys.float().transpose(1, 2))
    torch.bmm(torch.softmax(scores, dim=-1), values.float(), out=out)


def deterministic_kernels() -> None:
    """On CUDA, what batch invariance needs beyond fixed shapes: no TF32 or reduced-precision sums, one
    cuBLAS workspace (no split-K by free memory). Call before CUDA starts; a no-op effect on CPUs."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def use_row_attention(model) -> None:
    """Make `model`'s language model attend through row_attention (its vision tower keeps its own)."""
    model.config.get_text_config()._attn_implementation = ATTENTION


# transformers looks attention functions up by name in its own registry: registering ours there is how a
# model picks it; the mask function is SDPA's, for the calls that fall through to SDPA.
AttentionInterface.register(ATTENTION, row_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
