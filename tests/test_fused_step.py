"""The engine's fused decode step (backend.decode.fused_step) computes transformers' forward, to rounding."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from backend.decode import fused_step
from backend.decode.batch_cache import BatchCache, RowKV, use_row_attention
from backend.decode.engine import Engine, EngineLimits
from backend.decode.fused_step import FusedDecodeStep, fused_decode_step
from backend.models.packed_weights import pack_linears
from backend.models.row_kernels import unavailable_reason as row_kernels_reason
from backend.settings import GenerationSettings

SHAPE = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped query attention, as SmolLM2 and Llama 3
    max_position_embeddings=256,
)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "llama-with-biases": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, attention_bias=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),  # biases on q, k and v
    "mistral-window-4": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=4)),
}
DTYPES = {"float32": (torch.float32, 1e-4), "bfloat16": (torch.bfloat16, 3e-2)}  # tolerance / max |logit|
PROMPTS = [[5, 17, 9, 30, 3, 12, 22, 7, 40], [8, 2], [100, 101, 102, 103, 104]]  # 3 rows of an 8-row batch
ROWS = 8


def build(kind: str, dtype: torch.dtype, packed: bool = True, kernels=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODELS[kind]() if kind in MODELS else kind()
        for parameter in model.parameters():  # random biases and norm weights, so that a dropped one shows
            if parameter.dim() == 1 and parameter.abs().sum() == 0:
                parameter.data.normal_(0, 0.5)
            elif parameter.dim() == 1 and bool((parameter == 1).all()):
                parameter.data.normal_(1, 0.5)
    model = model.to(dtype).eval()
    use_row_attention(model)
    if packed:
        report = pack_linears(model, kernels=kernels)
        assert report.layers > 0 and (kernels is None or report.row_layers == report.layers)
    return model


def prefilled(model) -> list[RowKV]:
    rows = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            row = RowKV(32)
            cache = BatchCache([row])
            model(input_ids=torch.tensor([prompt]), past_key_values=cache, batch_cache=cache, use_cache=True)
            rows.append(row)
    return rows


def step_inputs(rows: list[RowKV]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((ROWS,), 3, dtype=torch.long)
    positions = torch.zeros((ROWS,), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index], positions[index] = 60 + index, row.length
    return ids, positions


def layer_calls(row_kernels, monkeypatch) -> list[int]:
    """Grows by one for every decoder_layer call (a whole layer in one row-kernel call) from now on."""
    calls, whole = [], row_kernels.library.decoder_layer
    monkeypatch.setattr(row_kernels.library, "decoder_layer", lambda *args: calls.append(1) or whole(*args))
    return calls


def transformers_step(model, rows: list[RowKV]) -> torch.Tensor:
    ids, positions = step_inputs(rows)
    cache = BatchCache(rows)
    with torch.inference_mode():
        out = model(
            input_ids=ids[:, None], position_ids=positions[:, None], past_key_values=cache, batch_cache=cache
        )
    return out.logits[:, -1]


@pytest.mark.parametrize("kernels", ["oneDNN", "row-kernels"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_fused_decode_step_gives_transformers_logits_and_keys(kind, dtype, kernels, request):
    torch_dtype, tolerance = DTYPES[dtype]
    rows = request.getfixturevalue("row_kernels") if kernels == "row-kernels" else None
    model = build(kind, torch_dtype, kernels=rows)
    step, text = fused_decode_step(model)
    assert isinstance(step, FusedDecodeStep), text
    assert (
        text == ("fused (row kernels' post-ops" if rows else "fused (oneDNN post-ops") + " on packed weights)"
    )
    theirs_rows, ours_rows = prefilled(model), prefilled(model)
    theirs = transformers_step(model, theirs_rows)
    ours = step(*step_inputs(ours_rows), ours_rows)
    assert theirs.shape == (ROWS, model.config.vocab_size)  # the fused step gives its rows' logits only
    assert ours.shape == (len(PROMPTS), model.config.vocab_size) and ours.dtype == torch_dtype
    scale = theirs[: len(PROMPTS)].float().abs().max()
    for index in range(len(PROMPTS)):
        difference = (ours[index].float() - theirs[index].float()).abs().max()
        assert difference <= tolerance * scale, (index, difference, scale)
        assert ours[index].argmax() == theirs[index].argmax()
        for layer in range(model.config.num_hidden_layers):  # this step's keys and values went to its row
            for mine, reference in zip(
                ours_rows[index].view(layer), theirs_rows[index].view(layer), strict=True
            ):
                assert mine.shape == reference.shape
                assert (mine - reference).float().abs().max() <= tolerance * reference.float().abs().max()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", [*MODELS, "head-dim-24"])
def test_a_layer_in_one_row_kernel_call_is_the_op_by_op_step_bit_for_bit(
    kind, dtype, row_kernels, monkeypatch
):
    """decoder_layer (one call a layer) against the same maths op by op: logits and every written key and
    value equal over 3 steps. A head of 24 has rotary halves of 12: the vectors' tail masks."""
    if kind == "head-dim-24":
        narrow = dict(SHAPE, hidden_size=96, num_attention_heads=4)
        kind = lambda: LlamaForCausalLM(LlamaConfig(**narrow))  # noqa: E731
    model = build(kind, DTYPES[dtype][0], kernels=row_kernels)
    step, _ = fused_decode_step(model)
    calls = layer_calls(row_kernels, monkeypatch)
    results = {}
    for path in ("one call", "op by op"):
        if path == "op by op":
            monkeypatch.setattr(fused_step, "_row_weights", lambda *args: None)
        rows, logits = prefilled(model), []
        for _ in range(3):
            logits.append(step(*step_inputs(rows), rows))
        results[path] = (logits, [part for row in rows for layer in range(2) for part in row.view(layer)])
    assert len(calls) == 3 * model.config.num_hidden_layers  # the first path ran through decoder_layer only
    for mine, reference in zip(*(results[path][0] + results[path][1] for path in results), strict=True):
        assert torch.equal(mine, reference)


@pytest.mark.parametrize("kernels", ["oneDNN", "row-kernels"])
def test_rows_of_a_fused_step_do_not_see_each_other(kernels, request):
    """Row 0 gets the same bits beside other rows as beside padding alone: on oneDNN its shapes are the same;
    the row kernels compute it alone either way (and skip the padding)."""
    row_kernels = request.getfixturevalue("row_kernels") if kernels == "row-kernels" else None
    model = build("llama", torch.bfloat16, kernels=row_kernels)
    step, _ = fused_decode_step(model)
    rows = prefilled(model)
    together = step(*step_inputs(rows), rows)[0]
    first = prefilled(model)[:1]
    alone = step(*step_inputs(first), first)[0]
    assert torch.equal(together, alone)


@pytest.mark.parametrize("kernels", ["oneDNN", "row-kernels"])
def test_the_head_reads_the_fixed_batch_on_onednn_and_only_the_rows_of_requests_on_the_row_kernels(
    kernels, request
):
    """oneDNN's numbers may depend on the rows it is given, so it always gets the engine's fixed batch; the
    row kernels compute each row alone and skip the padding. Either way the step returns its rows' logits."""
    on_rows = kernels == "row-kernels"
    row_kernels = request.getfixturevalue("row_kernels") if on_rows else None
    model = build("llama", torch.bfloat16, kernels=row_kernels)
    step, _ = fused_decode_step(model)
    rows, seen = prefilled(model), []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    logits = step(*step_inputs(rows), rows)
    assert seen == [len(PROMPTS) if on_rows else ROWS]
    assert logits.shape == (len(PROMPTS), model.config.vocab_size)


def test_a_head_too_wide_for_a_layer_call_keeps_the_op_by_op_step_on_the_row_kernels(
    row_kernels, monkeypatch
):
    """decoder_layer holds a head of at most 512 in its buffers; a wider one runs op by op, never fails."""
    wide = dict(SHAPE, hidden_size=520, intermediate_size=64, num_attention_heads=1, num_key_value_heads=1)
    model = build(lambda: LlamaForCausalLM(LlamaConfig(**wide)), torch.float32, kernels=row_kernels)
    step, _ = fused_decode_step(model)
    calls = layer_calls(row_kernels, monkeypatch)
    theirs_rows, ours_rows = prefilled(model), prefilled(model)
    theirs = transformers_step(model, theirs_rows)[: len(PROMPTS)]
    ours = step(*step_inputs(ours_rows), ours_rows)
    assert not calls
    assert (ours - theirs).abs().max() <= DTYPES["float32"][1] * theirs.abs().max()


def test_a_row_kernel_layer_computes_the_rows_with_keys_and_passes_the_padding_through(row_kernels):
    model = build("llama", torch.bfloat16, kernels=row_kernels)
    step, _ = fused_decode_step(model)
    rows = prefilled(model)
    ids, positions = step_inputs(rows)
    x = torch.randn(ROWS, model.config.hidden_size).to(torch.bfloat16)
    cos, sin = step.rotary(x[:, None], positions[:, None])
    weights = fused_step._row_weights(step.layers[0], step._fixed[0], x.dtype)
    with torch.inference_mode():
        out = step._row_layer(0, weights, x, cos, sin, rows, row_kernels.library)
    assert torch.equal(out[len(rows) :], x[len(rows) :])
    assert not torch.equal(out[: len(rows)], x[: len(rows)])


def test_what_cannot_be_fused_says_why_and_keeps_transformers_forward():
    unpacked = build("llama", torch.float32, packed=False)
    assert fused_decode_step(unpacked) == (
        None,
        "transformers' forward (its linear layers are not all oneDNN-packed)",
    )
    gemma = build(lambda: GemmaForCausalLM(GemmaConfig(**SHAPE, head_dim=32)), torch.float32)
    step, text = fused_decode_step(gemma)  # scales its embeddings: not Llama's maths
    assert step is None and "model type 'gemma'" in text
    lora = get_peft_model(
        build("llama", torch.float32, packed=False), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    ).base_model.model
    pack_linears(lora)
    step, text = fused_decode_step(lora)
    assert step is None and "not all oneDNN-packed" in text


class Counted:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = FusedDecodeStep.__call__

        def call(step, *args):
            self.calls += 1
            return original(step, *args)

        monkeypatch.setattr(FusedDecodeStep, "__call__", call)


def reply(engine: Engine) -> str:
    settings = GenerationSettings(seed=1, max_new_tokens=6, mode="greedy", repetition_penalty=1.0)
    updates = [u for u in engine.submit(PROMPTS[0], settings) if u.queue_position is None]
    return updates[-1].new_tokens


@pytest.mark.parametrize("fused", [True, False])
def test_the_engine_decodes_through_the_fused_step_unless_told_not_to(fused, demo_tokenizer, monkeypatch):
    model = build("llama", torch.bfloat16)
    counted = Counted(monkeypatch)
    engine = Engine(model, demo_tokenizer, EngineLimits(fused_decode=fused, idle_seconds=0.05))
    try:
        assert reply(engine) == 6
    finally:
        engine.close()
    assert counted.calls == (5 if fused else 0)  # 6 tokens: the prefill's, then 5 decode steps
    assert engine.decode_path.startswith("fused" if fused else "transformers' forward (--no-fused-decode)")


def wrap_a_layer(model, monkeypatch) -> None:
    mlp = model.model.layers[-1].mlp
    monkeypatch.setattr(mlp, "up_proj", torch.nn.Sequential(mlp.up_proj))  # as PEFT wraps one


def replace_the_forward(model, monkeypatch) -> None:
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *args, **kwargs: original(*args, **kwargs))


def hook_the_forward(model, monkeypatch) -> None:
    model.register_forward_hook(lambda module, args, output: None)


@pytest.mark.parametrize("change", [wrap_a_layer, replace_the_forward, hook_the_forward])
def test_a_model_changed_after_the_engine_started_decodes_through_transformers_again(
    change, demo_tokenizer, monkeypatch
):
    model = build("llama", torch.float32)
    counted = Counted(monkeypatch)
    engine = Engine(model, demo_tokenizer, EngineLimits(idle_seconds=0.05))
    try:
        assert reply(engine) == 6 and counted.calls == 5
        change(model, monkeypatch)
        assert reply(engine) == 6
    finally:
        engine.close()
    assert counted.calls == 5


@pytest.mark.parametrize(
    "argv, env, fused",
    [([], {}, True), (["--no-fused-decode"], {}, False), ([], {"PLAYGROUND_NO_FUSED_DECODE": "1"}, False)],
)
def test_the_flag_and_its_variable_reach_the_engine_and_the_system_tab(argv, env, fused):
    import gradio as gr

    from app import local_services
    from backend.config import parse_config
    from backend.request_stats import RequestStats
    from ui.system_tab import build_system_tab

    config = parse_config(argv, has_gpu=False, env=env)
    assert config.server.fused_decode is fused
    chat, _, _ = local_services(config, load_in_background=False, stats=RequestStats())
    assert chat.engine_limits.fused_decode is fused
    assert chat.decode_path() is None  # no engine before the first request
    settings = GenerationSettings(seed=1, max_new_tokens=2, mode="greedy", repetition_penalty=1.0)
    assert list(chat.chat("Hello", [], settings))[-1].done
    # The app's models load on the row kernels where this CPU takes them (built before the tests: conftest).
    kernels = "row kernels'" if row_kernels_reason() is None else "oneDNN"
    shown = f"fused ({kernels} post-ops" if fused else "transformers' forward (--no-fused-decode)"
    with gr.Blocks() as demo, gr.Tabs():
        build_system_tab(demo, chat)
    refresh = next(
        event.fn
        for event in demo.fns.values()
        if any(getattr(block, "elem_id", None) == "system-model" for block in event.outputs)
    )
    assert f"**Decode step:** {shown}" in refresh()[0]  # what the System tab's timer draws
