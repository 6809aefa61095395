"""The engine's decode step for Llama-shaped models on packed CPU weights, without transformers' forward.

Ours because a decode step of a small model is mostly overhead around its matrix multiplies: transformers'
forward runs about 2,000 small operations and its per-layer Python for 210 of them, and eager PyTorch has
no fusion. Here the same maths runs with oneDNN doing the SiLU, the gate product and both residual adds
inside the matrix multiplies (post-ops on the packed weights of backend.models.packed_weights), so a layer
is 7 oneDNN calls and a few small operations. Measured on SmolLM2-135M's shape, 8 rows, 2 cores, the forward
alone: 17-19 ms a bfloat16 step against 23-24 through transformers. In the engine, side by side in
benchmarks/serving.py with batch_cache.decode_attention: 1.27x and 1.24x tok/s at 1 and 8 users in bfloat16,
1.09x and 0.95x (noise) in float32. torch.compile was measured first and lost (docs/serving.md).

On the row kernels (backend.models.row_kernels) a whole layer is one call, decoder_layer: the same maths and
roundings bit for bit (tests check it), without a layer's ~25 Python-level operations. Side by side here,
SmolLM2-135M's shape in bfloat16: one row 8.7-9.7 ms a step against 10.3-11.7 op by op, 8 rows 11.9-13.0
against 13.1-15.0; float32, one row 15.7-16.5 against 16.6-18.1.

Seeds hold as before: every tensor has the shape of the fixed batch or of one request's own keys, and each
row attends alone through backend.decode.batch_cache. The row kernels compute every row alone (their
numbers never depend on the other rows or how many there are, tested bit for bit), so on them the layers
and the head skip the fixed batch's padding rows; oneDNN always gets the whole fixed batch. The numbers
differ from transformers' forward in the last bits (a fused post-op rounds once where two operations round
twice), so prefills, beam search and the Inspector, which run transformers' forward, agree with it to
rounding, not bit for bit.

Only models whose maths this file repeats exactly are taken (Llama, Mistral, Qwen2: pre-norm RMSNorm,
rotary q/k, SiLU-gated MLP, no q/k norms, no embedding scale, no logit softcap); any other model, a layer
that is not packed (quantized, LoRA-wrapped, on a GPU) or --no-fused-decode keeps transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from backend.decode import batch_cache
from backend.decode.batch_cache import RowKV
from backend.models.packed_weights import PackedLinear
from backend.models.row_kernels import DTYPES, RowsWeight

MODEL_TYPES = ("llama", "mistral", "qwen2")  # the same decoder layer, up to biases and a sliding window
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class _Layer:
    input_norm: nn.Module
    post_attention_norm: nn.Module
    q: PackedLinear
    k: PackedLinear
    v: PackedLinear
    o: PackedLinear
    gate: PackedLinear
    up: PackedLinear
    down: PackedLinear
    scaling: float
    sliding_window: int | None

    @property
    def parts(self) -> tuple[PackedLinear, ...]:
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)


def _fixed_arguments(layer: _Layer, head_dim: int) -> tuple:
    """What decoder_layer takes of a layer that never changes, read once: parameters through nn.Module's
    __getattr__ cost about 1 us each, and a step would read 13 of them a layer."""
    parts, norms = layer.parts, (layer.input_norm, layer.post_attention_norm)
    return (
        [part.out_features for part in parts],
        [part.bias for part in parts],
        *(value for norm in norms for value in (norm.weight, getattr(norm, "variance_epsilon", None))),
        layer.scaling if layer.scaling is not None else head_dim**-0.5,
        layer.sliding_window or 0,
    )


class FusedDecodeStep:
    """One token for each of a batch's rows: `step(ids [B], positions [B], rows)` -> logits
    [len(rows), vocab]. Row i writes its keys and values into rows[i] and attends over them alone; rows
    beyond len(rows) are padding (the row kernels skip them: a row never depends on the others or their
    count)."""

    def __init__(self, model: nn.Module):
        inner, config = model.model, model.config
        self.model = model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = [
            _Layer(
                layer.input_layernorm,
                layer.post_attention_layernorm,
                *(getattr(parent, name) for parent, name in _projections(layer)),
                layer.self_attn.scaling,
                _window(layer.self_attn, config),
            )
            for layer in inner.layers
        ]
        self._fixed = [_fixed_arguments(layer, self.head_dim) for layer in self.layers]
        # What decoder_layer takes (row_kernels.cpp checks it too): rotary halves, a head its buffers hold.
        self._layer_calls = self.head_dim % 2 == 0 and self.head_dim <= 512
        # Every projection as found, to notice one wrapped later. Read from the parents' module dicts:
        # about 9 µs a step for SmolLM2's 210, against 253 through nn.Module.__getattr__ (measured here).
        self._parts = [
            (parent._modules, name, getattr(parent, name))
            for layer in inner.layers
            for parent, name in _projections(layer)
        ]

    def describe(self) -> str:
        """What runs, in words: the kernels doing the post-ops are those of the first layer's q projection
        (a model moves to the row kernels whole: backend.models.packed_weights.adopt_row_kernels)."""
        kernels = "row kernels'" if self._row_library() is not None else "oneDNN"
        return f"fused ({kernels} post-ops on packed weights)"

    def _row_library(self):
        """The row kernels' library while the model runs on them (it moves to them whole), else None."""
        packed = self.layers[0].q.packed if self.layers else None
        return packed.kernels.library if type(packed) is RowsWeight else None

    def still_applies(self) -> bool:
        """False once the model's layers are no longer the packed ones this step holds (wrapped since), or
        once its forward is replaced or hooked (accelerate, instrumentation): a step then goes through it."""
        model = self.model
        if "forward" in vars(model) or model._forward_hooks or model._forward_pre_hooks:
            return False
        return all(modules.get(name) is part for modules, name, part in self._parts)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, rows: list[RowKV]) -> torch.Tensor:
        batch = ids.shape[0]
        x = self.embed(ids.view(batch, 1))  # [B, 1, hidden], as transformers holds it
        cos, sin = self.rotary(x, positions.view(batch, 1))
        x = x.view(batch, -1)
        kernels = self._row_library()  # on the row kernels, their norms and attention too
        on_rows = kernels is not None and self._layer_calls
        for index, layer in enumerate(self.layers):
            weights = _row_weights(layer, self._fixed[index], x.dtype) if on_rows else None
            if weights is not None:
                x = self._row_layer(index, weights, x, cos, sin, rows, kernels)
            else:
                x = self._layer(index, layer, x, cos, sin, rows, kernels)
        live = len(rows)
        head_on_rows = type(getattr(self.lm_head, "packed", None)) is RowsWeight
        if head_on_rows and _norm_on(self.norm, x.dtype, kernels):
            return self.lm_head(_norm(self.norm, x[:live], kernels))  # rows alone: padding skipped
        return self.lm_head(_norm(self.norm, x, kernels))[:live]

    def _row_layer(self, index: int, weights, x, cos, sin, rows: list[RowKV], kernels) -> torch.Tensor:
        """_layer's maths in one row-kernel call (decoder_layer), bit for bit: for one row of SmolLM2's
        shape a layer's ~25 Python-level operations cost about 1 ms a step of the 9-10 (measured side by
        side here)."""
        claimed = [row.claim_one(index) for row in rows]
        outs, biases, input_norm, input_eps, post_norm, post_eps, scaling, window = self._fixed[index]
        batch = x.shape[0]
        return kernels.decoder_layer(
            x, weights, outs, biases, input_norm, input_eps, post_norm, post_eps, cos.view(batch, -1),
            sin.view(batch, -1), self.heads, self.kv_heads, scaling, window,
            [claim[0] for claim in claimed], [claim[1] for claim in claimed], [claim[2] for claim in claimed],
        )  # fmt: skip

    def _layer(self, index: int, layer: _Layer, x, cos, sin, rows: list[RowKV], kernels) -> torch.Tensor:
        batch, heads, kv_heads, dim = x.shape[0], self.heads, self.kv_heads, self.head_dim
        h = _norm(layer.input_norm, x, kernels)
        q, k, v = layer.q.rows(h), layer.k.rows(h), layer.v.rows(h)
        # q and k turned together: transformers' rotary maths (apply_rotary_pos_emb), one pass for both.
        qk = torch.cat((q, k), dim=1).view(batch, heads + kv_heads, dim)
        qk = qk * cos + rotate_half(qk) * sin
        attended = batch_cache.decode_attention(
            rows, index, qk[:, :heads], qk[:, heads:], v.view(batch, kv_heads, dim), layer.scaling,
            layer.sliding_window, kernels.attend_rows if kernels is not None else None,
        )  # fmt: skip
        x = layer.o.rows_then(attended, x, "add")  # x + o_proj(attention)
        h = _norm(layer.post_attention_norm, x, kernels)
        gate = layer.gate.rows(h, then="swish")  # silu(gate_proj(h))
        mixed = layer.up.rows_then(h, gate, "mul")  # up_proj(h) * gate
        return layer.down.rows_then(mixed, x, "add")  # x + down_proj(mixed)


def _norm(norm: nn.Module, x: torch.Tensor, kernels) -> torch.Tensor:
    """The model's RMSNorm, as one row-kernel call where they run (about 3 us against 16 for its 6 torch
    operations here); Llama's, Mistral's and Qwen2's are the same maths (MODEL_TYPES)."""
    if not _norm_on(norm, x.dtype, kernels):
        return norm(x)
    return kernels.rms_norm(x.contiguous(), norm.weight, norm.variance_epsilon)


def _norm_on(norm: nn.Module, dtype: torch.dtype, kernels) -> bool:
    """Whether _norm runs `norm` on the row kernels (a row at a time) for x of `dtype`."""
    return kernels is not None and dtype in DTYPES and norm.weight.dtype == dtype


def _row_weights(layer: _Layer, fixed: tuple, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """The layer's 7 packed weights when all are on the row kernels and its norms suit them, else None."""
    packed = [part.packed for part in layer.parts]
    if any(type(weight) is not RowsWeight for weight in packed) or dtype not in DTYPES:
        return None
    _, _, input_norm, input_eps, post_norm, post_eps, _, _ = fixed
    if input_norm.dtype != dtype or post_norm.dtype != dtype or input_eps is None or post_eps is None:
        return None
    return [weight.packed for weight in packed]


def _window(attention: nn.Module, config) -> int | None:
    """The keys a layer attends over, as its forward passes them: Qwen2 per layer, Mistral model-wide."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(config, "sliding_window", None) if config.model_type == "mistral" else None


def _projections(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of a decoder layer's 7 linear layers, attention's then the MLP's."""
    return [(layer.self_attn, name) for name in PROJECTIONS] + [(layer.mlp, name) for name in MLP]


def fused_decode_step(model: nn.Module) -> tuple[FusedDecodeStep | None, str]:
    """The fused step for `model` and what runs, in words; (None, why not) where it does not apply."""
    reason = unsupported_reason(model)
    if reason:
        return None, f"transformers' forward ({reason})"
    step = FusedDecodeStep(model)
    return step, step.describe()


def unsupported_reason(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"no fused step for model type {model_type!r}"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "norm", "layers")):
        return "an unfamiliar module layout"
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "mlp_bias", False):
        return "an MLP other than Llama's"
    for layer in inner.layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is None or mlp is None or hasattr(attention, "q_norm"):
            return "an unfamiliar decoder layer"
        parts = [getattr(parent, name, None) for parent, name in _projections(layer)]
        if any(type(part) is not PackedLinear for part in parts):  # quantized, LoRA-wrapped or unpacked
            return "its linear layers are not all oneDNN-packed"
    return None
