"""Seeds hold under load: a request's numbers do not depend on what else is in the batch, by construction.

Two kinds of test. The shape tests hold on any machine: they record the shape of every matrix multiply
and attention call and check that none depends on a request's neighbours, which is what makes the
numbers equal whatever kernels a CPU (AVX2, AVX512-BF16, AMX) or GPU picks for a shape. The bitwise
tests then compare token ids and first-step logits alone and in a batch, in float32 and bfloat16 (the
dtype the app picks on a bf16 CPU and on GPUs), on a model wide enough (576, SmolLM2's width) that a
float32 Linear here gives other last bits for 1 row than for 2 or more.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import backend.decode.batch_cache as batch_cache
from backend.decode.engine import Engine, EngineLimits
from backend.decode.generation import RequestState
from backend.models.packed_weights import pack_linears
from backend.models.row_kernels import RowsWeight
from backend.settings import GenerationSettings
from tests.streams import last_items_together, no_early_end, plugged

ROWS = 8
PROMPT_LENGTHS = [5, 17, 9, 30, 3, 12, 22, 7]
MODES = {
    "sampled": dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
    "greedy": dict(mode="greedy", repetition_penalty=1.0),
}


# As the app runs a model on the CPU: on AVX-512 CPUs on the row kernels (backend.models.row_kernels), on
# others oneDNN on packed weights (backend.models.packed_weights), decode steps fused
# (backend.decode.fused_step), in the dtype it picks here and in float32; bfloat16 decoded through
# transformers' forward (--no-fused-decode); float32 on PyTorch's default kernels (--no-packed-weights).
# (dtype, packed for: "rows", "oneDNN" or None, fused decode step)
KERNELS = {
    "bfloat16-row-kernels": (torch.bfloat16, "rows", True),
    "float32-row-kernels": (torch.float32, "rows", True),
    "float32": (torch.float32, "oneDNN", True),
    "bfloat16": (torch.bfloat16, "oneDNN", True),
    "bfloat16-transformers-step": (torch.bfloat16, "oneDNN", False),
    "float32-unpacked": (torch.float32, None, False),
}


@pytest.fixture(scope="module", params=list(KERNELS.values()), ids=list(KERNELS))
def wide_model(request, demo_tokenizer, row_kernels_built):
    config = LlamaConfig(
        vocab_size=-(-len(demo_tokenizer) // 64) * 64,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=3,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=512,
        bos_token_id=demo_tokenizer.bos_token_id,
        eos_token_id=demo_tokenizer.eos_token_id,
        pad_token_id=demo_tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    dtype, packed, fused = request.param
    if packed == "rows" and row_kernels_built is None:
        pytest.skip("no row kernels on this CPU")
    model = model.to(dtype).eval()  # random weights: a fresh model has no rotary buffers to spoil
    if packed:
        report = pack_linears(model, kernels=row_kernels_built if packed == "rows" else None)
        assert report.layers == 3 * 7 + 1 and report.row_layers == (report.layers if packed == "rows" else 0)
    model.fused_decode = fused  # for the engine fixture
    return model


@pytest.fixture
def engine(wide_model, demo_tokenizer):
    limits = EngineLimits(
        max_batch_size=ROWS, max_queue=16, idle_seconds=0.05, fused_decode=wide_model.fused_decode
    )
    engine = Engine(wide_model, demo_tokenizer, limits)
    assert engine.decode_path.startswith("fused") == wide_model.fused_decode
    yield engine
    engine.close()


def prompt(index: int) -> list[int]:
    generator = torch.Generator().manual_seed(index)
    return [1] + torch.randint(5, 900, (PROMPT_LENGTHS[index] - 1,), generator=generator).tolist()


def settings(index: int, mode: str) -> GenerationSettings:
    return GenerationSettings(seed=1000 + index, max_new_tokens=12, **MODES[mode])


class Recorder:
    """Each request's first-step logits and token ids, keyed by its seed (unique per request here)."""

    def __init__(self, monkeypatch):
        self.first_logits: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, list[int]] = {}
        original = RequestState.step

        def step(state, logits):
            update = original(state, logits)
            self.first_logits.setdefault(state.settings.seed, logits.detach().clone())
            self.tokens[state.settings.seed] = list(state.generated)
            return update

        monkeypatch.setattr(RequestState, "step", step)

    def of(self, index: int) -> tuple[torch.Tensor, list[int]]:
        return self.first_logits[1000 + index], self.tokens[1000 + index]


def drain(handles) -> None:
    last_items_together([(u for u in handle if u.queue_position is None) for handle in handles])


def alone(engine, index: int, mode: str) -> None:
    drain([engine.submit(prompt(index), settings(index, mode))])


def assert_same(recorder: Recorder, reference: dict[int, tuple[torch.Tensor, list[int]]]) -> None:
    for index, (logits, tokens) in reference.items():
        batched_logits, batched_tokens = recorder.of(index)
        assert batched_tokens == tokens, f"request {index}: other tokens beside others than alone"
        assert torch.equal(batched_logits, logits), (
            f"request {index}: first-step logits differ in the last bits"
        )


@pytest.mark.parametrize("mode", list(MODES))
def test_a_request_gets_the_same_bits_alone_and_with_seven_others_at_once(
    engine, demo_tokenizer, monkeypatch, mode
):
    no_early_end(monkeypatch)
    recorder = Recorder(monkeypatch)
    for index in range(ROWS):
        alone(engine, index, mode)
    reference = {index: recorder.of(index) for index in range(ROWS)}
    recorder.first_logits.clear()
    with plugged(engine, prompt(0)):  # all eight wait, then start together
        handles = [engine.submit(prompt(i), settings(i, mode)) for i in range(ROWS)]
    drain(handles)
    assert_same(recorder, reference)


@pytest.mark.parametrize("mode", list(MODES))
def test_staggered_newcomers_of_mixed_lengths_change_no_bits(engine, monkeypatch, mode):
    no_early_end(monkeypatch)
    recorder = Recorder(monkeypatch)
    for index in range(5):
        alone(engine, index, mode)
    reference = {index: recorder.of(index) for index in range(5)}
    recorder.first_logits.clear()
    handles, streams = [], []
    for index in range(5):  # each joins once the one before has its first token: mid-reply of the others
        handle = engine.submit(prompt(index), settings(index, mode))
        stream = (u for u in handle if u.queue_position is None)
        first = next(stream)
        assert not first.finished
        handles.append(handle)
        streams.append(stream)
    last_items_together(streams)
    assert_same(recorder, reference)


class MatrixMultiplies(TorchDispatchMode):
    """Records the input rows of every matrix multiply with a weight, as the dispatcher sees it: oneDNN's
    packed linear (plain, fused with SiLU or an add), or PyTorch's linear (mm/addmm outside inference
    mode), whichever path runs them. A shape is (rows, input features), the rows being every token."""

    LINEAR = {"mkldnn::_linear_pointwise": 0, "aten::linear": 0, "aten::mm": 0, "aten::addmm": 1}

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        place = self.LINEAR.get(func._schema.name)
        if place is not None:
            features = args[place].shape[-1]
            self.record((args[place].numel() // features, features))
        return func(*args, **(kwargs or {}))


def test_every_matrix_multiply_and_attention_has_a_shape_of_its_own_request_or_the_fixed_batch(
    wide_model, engine, monkeypatch, row_kernels_built
):
    """Machine-independent: what AMX or a GPU would show, shown by shapes on any CPU."""
    no_early_end(monkeypatch)
    linear_inputs: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    attention: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = defaultdict(list)
    run = ["alone"]
    recording = MatrixMultiplies(lambda shape: linear_inputs[run[0]].append(shape))

    def watched(method):
        def call(*args, **kwargs):
            with recording:  # dispatch modes are per thread: enter it in the engine's
                return method(*args, **kwargs)

        return call

    original_rows = RowsWeight.linear
    # The row kernels: our own calls, which the dispatcher does not see. Every row's numbers there are its own
    # whatever the others are or how many (test_row_kernels, test_fused_step: bit for bit), so what they must
    # show is rows of requests only: the rows each call computed.
    row_calls: dict[str, list[int]] = defaultdict(list)
    layer_rows: dict[str, list[int]] = defaultdict(list)  # rows a whole decoder_layer call computed

    def rows_linear(weight, x, *rest):
        row_calls[run[0]].append(x.numel() // x.shape[-1])
        return original_rows(weight, x, *rest)

    monkeypatch.setattr(RowsWeight, "linear", rows_linear)
    monkeypatch.setattr(Engine, "_admit", watched(Engine._admit))  # prefills
    monkeypatch.setattr(Engine, "_decode_step", watched(Engine._decode_step))
    original_attend = batch_cache._attend

    def attend(query, keys, values, *rest):
        attention[run[0]].append((tuple(query.shape), tuple(keys.shape)))
        return original_attend(query, keys, values, *rest)

    monkeypatch.setattr(batch_cache, "_attend", attend)
    decode_rows: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = defaultdict(list)
    original_row = batch_cache._decode_row

    def decode_row(query, keys, values, out):  # a decode row's float32 attention (fused step, _one_query)
        decode_rows[run[0]].append((tuple(query.shape), tuple(keys.shape)))
        return original_row(query, keys, values, out)

    monkeypatch.setattr(batch_cache, "_decode_row", decode_row)
    if row_kernels_built is not None:  # the row kernels' attention: every row's shapes, as _decode_row's

        def record_rows(heads, kv_heads, dim, window, lengths):
            for n in lengths:
                grouped = (kv_heads, heads // kv_heads, dim)
                decode_rows[run[0]].append((grouped, (kv_heads, min(n, window) if window else n, dim)))

        def attend_rows(
            query,
            new_keys,
            new_values,
            keys,
            values,
            lengths,
            window,
            original=row_kernels_built.library.attend_rows,
        ):
            record_rows(query.shape[1], *new_keys.shape[1:], window, lengths)
            return original(query, new_keys, new_values, keys, values, lengths, window)

        monkeypatch.setattr(row_kernels_built.library, "attend_rows", attend_rows)

        def decoder_layer(x, weights, outs, *rest, original=row_kernels_built.library.decoder_layer):
            # A whole layer in one call: it computes the rows that have keys (len(lengths)), each attending
            # over its own keys as above; the batch's padding rows pass through.
            heads, kv_heads, window, lengths = rest[7], rest[8], rest[10], rest[13]
            layer_rows[run[0]].append(len(lengths))
            record_rows(heads, kv_heads, outs[0] // heads, window, lengths)
            return original(x, weights, outs, *rest)

        monkeypatch.setattr(row_kernels_built.library, "decoder_layer", decoder_layer)
    alone(engine, 3, "sampled")
    run[0] = "batched"
    with plugged(engine, prompt(0)):
        handles = [engine.submit(prompt(i), settings(i, "sampled")) for i in range(ROWS)]
    drain(handles)
    hidden = wide_model.config.hidden_size
    own_lengths = set(PROMPT_LENGTHS) | {1}  # a prefill's head reads its last position only
    for name in ("alone", "batched"):
        for rows, _ in linear_inputs[name]:
            # A decode step: exactly ROWS rows of one token; a prefill: one request's prompt, alone.
            assert rows == ROWS or rows in own_lengths, (name, rows)
        for query, keys in attention[name]:
            assert query[0] == keys[0] == 1, (name, query, keys)  # attention is per row, over its own keys
        for query, keys in decode_rows[name]:
            assert keys[0] == query[0], (name, query, keys)  # a row's grouped heads over its own kv heads
    # The request alone saw nothing that it does not also see in the batch.
    assert set(linear_inputs["alone"]) <= set(linear_inputs["batched"])
    assert set(attention["alone"]) <= set(attention["batched"])
    assert set(decode_rows["alone"]) <= set(decode_rows["batched"])
    if wide_model.fused_decode:
        # each row's first step reads its own prompt and one token, never padding
        assert {keys[1] for _, keys in decode_rows["batched"]} >= {n + 1 for n in PROMPT_LENGTHS}
        # decode steps' attention ran per row: one call per layer and step
        assert len(decode_rows["alone"]) == 11 * wide_model.config.num_hidden_layers
    layers = wide_model.config.num_hidden_layers
    if row_calls["alone"]:  # on the row kernels: rows of requests only, the padding skipped
        assert set(row_calls["alone"]) <= own_lengths
        assert set(row_calls["batched"]) <= own_lengths | set(range(1, ROWS + 1))
        assert layer_rows["alone"] == [1] * (11 * layers)  # a lone reply's 11 decode steps: its row alone
        assert set(layer_rows["batched"]) <= set(range(1, ROWS + 1)) and ROWS in layer_rows["batched"]
        assert row_calls["alone"].count(1) >= 11  # the head, once a decode step, on the reply's row alone
        return
    assert (ROWS, hidden) in linear_inputs["alone"]  # decode steps padded to the fixed row count
    # At least each layer's q, k, v, gate and up multiplies and the head, in each of the 11 decode steps
    # of a 12-token reply: the recording saw the decode steps whichever path ran them.
    seen = linear_inputs["alone"].count((ROWS, hidden))
    assert seen >= 11 * (5 * layers + 1), seen


def test_the_kv_budget_admits_in_order_and_never_holds_more_than_it_has(
    wide_model, demo_tokenizer, monkeypatch
):
    """16 requests against a budget of about three: all finish with their text alone, in order, within it."""
    no_early_end(monkeypatch)
    need = max(PROMPT_LENGTHS) + 12
    engine = Engine(
        wide_model,
        demo_tokenizer,
        EngineLimits(
            max_batch_size=ROWS, max_queue=16, kv_tokens=3 * need, poll_seconds=0.01, idle_seconds=0.05
        ),
    )
    recorder = Recorder(monkeypatch)
    try:
        for index in range(ROWS):
            alone(engine, index, "sampled")
        reference = {index: recorder.of(index) for index in range(ROWS)}
        recorder.first_logits.clear()
        peaks = []
        original = engine._decode_step

        def decode_step():
            peaks.append(engine.kv_usage()[0])
            original()

        monkeypatch.setattr(engine, "_decode_step", decode_step)
        with plugged(engine, prompt(0)):
            handles = [engine.submit(prompt(i % ROWS), settings(i % ROWS, "sampled")) for i in range(16)]
            assert [handle.position() for handle in handles] == list(range(1, 17))  # what each hears
        drain(handles)
    finally:
        engine.close()
    assert peaks and max(peaks) <= 3 * need  # never more KV reserved than the budget holds
    assert max(peaks) > need  # and more than one request at a time
    assert engine.kv_usage()[0] == 0  # every reservation given back
    assert_same(recorder, reference)


def test_without_invariance_steps_shrink_to_the_rows_in_use_and_replies_say_seeds_may_move(
    wide_model, demo_tokenizer, monkeypatch
):
    """--no-batch-invariance: one user's steps are one row, and the reply's numbers no longer promise."""
    from backend.config import parse_config

    assert parse_config([], has_gpu=False, env={}).server.batch_invariant
    assert not parse_config(["--no-batch-invariance"], has_gpu=False, env={}).server.batch_invariant
    rows = []
    hook = wide_model.lm_head.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    engine = Engine(wide_model, demo_tokenizer, EngineLimits(max_batch_size=ROWS, batch_invariant=False))
    try:
        drain([engine.submit(prompt(0), settings(0, "greedy"))])
    finally:
        hook.remove()
        engine.close()
    assert set(rows) == {1} and not engine.seed_holds


def test_llm_int8_outlier_layers_are_named_as_what_breaks_the_promise(wide_model):
    from backend.decode.engine import has_batch_outliers

    class Linear8bitLt(torch.nn.Module):  # what bitsandbytes' LLM.int8 layer is called, with its threshold
        def __init__(self, threshold):
            super().__init__()
            self.state = type("State", (), {"threshold": threshold})()

    assert not has_batch_outliers(wide_model)
    assert has_batch_outliers(torch.nn.Sequential(wide_model.lm_head, Linear8bitLt(6.0)))
    assert not has_batch_outliers(torch.nn.Sequential(Linear8bitLt(0.0)))  # no outliers: rows stay apart


def test_a_reply_that_cannot_promise_its_seed_says_so():
    from backend.replies import Reply

    kept = Reply("hi", True, 2, 0.1, 7, "sample", seed_holds=True)
    loose = Reply("hi", True, 2, 0.1, 7, "sample", seed_holds=False)
    assert "other text" not in kept.stats_line()
    assert "may give other text when others are served at once" in loose.stats_line()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_a_decode_rows_attention_is_sdpas_with_grouped_heads(dtype, tolerance):
    """backend.decode.batch_cache's one-query path (CPU decode steps) against SDPA with GQA."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, n = 9, 3, 64, 37
    query = (
        torch.randn(1, 1, heads, dim, generator=generator).transpose(1, 2).to(dtype)
    )  # as attention has it
    keys, values = (torch.randn(1, kv_heads, n, dim, generator=generator).to(dtype) for _ in range(2))
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), keys.float(), values.float(), scale=0.125, enable_gqa=True
    )
    got = batch_cache._attend(query, keys, values, 0.125, None, None)
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.allclose(got.float(), expected, atol=tolerance, rtol=tolerance)
