"""The row kernels (backend.models.row_kernels): each layer's maths, rows that never see each other, models
packed for them or moved to them between replies, and a build that a killed process cannot block."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backend.decode import batch_cache
from backend.decode.batch_cache import RowKV
from backend.decode.engine import Engine, EngineLimits
from backend.models.demo_text import default_cache_root
from backend.models.holder import ModelHolder
from backend.models.loading import ModelSpec
from backend.models.packed_weights import ROW_KERNELS, PackedLinear, adopt_row_kernels, pack_linears
from backend.models.row_kernels import KernelBuild, RowsWeight, library_name
from backend.request_stats import RequestStats
from backend.services.chat import ChatService
from backend.settings import GenerationSettings, ServerLimits
from tests import streams
from tests.streams import HANG, no_early_end, wait_until_idle
from tests.test_packed_weights import tiny_llama
from ui.banner import banner_markdown

watch_forwards = streams.watch_forwards  # a fixture: tests ask for it by name
DTYPES = {"float32": (torch.float32, 1e-5), "bfloat16": (torch.bfloat16, 1e-2)}  # tolerance / max |output|
OPS = ["none", "swish", "add", "mul"]


def random(*shape, generator, dtype, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_row_kernel_computes_its_layer_and_what_follows_it(row_kernels, dtype, op):
    torch_dtype, tolerance = DTYPES[dtype]
    generator = torch.Generator().manual_seed(0)
    # (out, in, bias): a partial column block, an input length that is not a multiple of 32, SmolLM2's width
    for out_features, in_features, has_bias in [(70, 64, True), (32, 130, False), (200, 576, True)]:
        weight = random(
            out_features, in_features, generator=generator, dtype=torch_dtype, scale=in_features**-0.5
        )
        bias = random(out_features, generator=generator, dtype=torch_dtype) if has_bias else None
        x = random(11, in_features, generator=generator, dtype=torch_dtype)
        other = (
            random(11, out_features, generator=generator, dtype=torch_dtype) if op in ("add", "mul") else None
        )
        got = row_kernels.pack(weight).linear(x, bias, other, op)
        assert got.shape == (11, out_features) and got.dtype == torch_dtype
        plain = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
        if op == "swish":
            expected = F.silu(plain)
        elif op in ("add", "mul"):
            expected = plain + other.double() if op == "add" else plain * other.double()
        else:
            expected = plain
        scale = expected.abs().max()
        assert (got.double() - expected).abs().max() <= tolerance * scale, (out_features, in_features)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_rows_numbers_never_depend_on_the_other_rows_or_how_many_there_are(row_kernels, dtype):
    """Bit for bit: what the engine's seeds rest on (each output one sum over k, in one order)."""
    torch_dtype = DTYPES[dtype][0]
    generator = torch.Generator().manual_seed(1)
    # Wide: a bfloat16 output rounds away most differences in float32 sums (4096 outputs show a few a row).
    weight = random(4096, 576, generator=generator, dtype=torch_dtype, scale=0.05)
    bias = random(4096, generator=generator, dtype=torch_dtype)
    packed = row_kernels.pack(weight)
    x = random(20, 576, generator=generator, dtype=torch_dtype)
    other = random(20, 4096, generator=generator, dtype=torch_dtype)
    together = packed.linear(x, bias)
    added = packed.linear(x, bias, other, "add")
    for start, count in [(0, 1), (5, 1), (0, 3), (2, 8), (3, 9), (1, 17), (0, 20)]:
        rows = slice(start, start + count)
        assert torch.equal(packed.linear(x[rows], bias), together[rows]), (start, count)
        assert torch.equal(packed.linear(x[rows], bias, other[rows], "add"), added[rows]), (start, count)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_model_packed_for_the_row_kernels_computes_its_logits(row_kernels, dtype):
    torch_dtype, tolerance = DTYPES[dtype]
    model = tiny_llama(torch_dtype)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = [model(ids[:rows]).logits.float() for rows in (1, 3)]
        report = pack_linears(model, kernels=row_kernels)
        got = [model(ids[:rows]).logits.float() for rows in (1, 3)]
    assert report.layers == report.row_layers == 2 * 7 + 1
    assert report.text.startswith(f"{ROW_KERNELS} on packed weights: on (15 linear layers")
    assert all(type(m.packed) is RowsWeight for m in model.modules() if type(m) is PackedLinear)
    assert model.model.layers[0].mlp.up_proj.weight.is_meta  # still one copy of each weight
    for want, have in zip(expected, got, strict=True):
        assert torch.allclose(have, want, rtol=tolerance, atol=3 * tolerance * want.abs().max().item())


def test_a_layer_the_row_kernels_do_not_take_stays_on_onednn(row_kernels):
    odd = nn.Sequential(nn.Linear(63, 16), nn.Linear(16, 8)).to(torch.bfloat16)  # bf16 pairs need even inputs
    x = torch.randn(4, 63, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.inference_mode():
        expected = odd(x).double()
        report = pack_linears(odd, kernels=row_kernels)
        got = odd(x).double()
    assert report.layers == 2 and report.row_layers == 1 and "; 1 on oneDNN" in report.text
    assert type(odd[0].packed) is torch.Tensor and type(odd[1].packed) is RowsWeight
    assert (got - expected).abs().max() <= 3e-2 * expected.abs().max()


def test_a_model_packed_for_onednn_moves_to_the_row_kernels_whole(row_kernels):
    model = tiny_llama(torch.bfloat16)  # tied: the output layer keeps the embedding's weight
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    pack_linears(model)
    with torch.inference_mode():
        before = model(ids).logits.float()
        moved = adopt_row_kernels(model, row_kernels)
        after = model(ids).logits.float()
    assert moved == 2 * 7 + 1
    assert all(type(m.packed) is RowsWeight for m in model.modules() if type(m) is PackedLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.allclose(after, before, rtol=2e-2, atol=6e-2 * before.abs().max().item())
    assert adopt_row_kernels(model, row_kernels) == 0  # nothing left to move


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_row_kernel_rms_norm_is_transformers_llama_rms_norm(row_kernels, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch_dtype = DTYPES[dtype][0]
    generator = torch.Generator().manual_seed(6)
    norm = LlamaRMSNorm(576, eps=1e-5).to(torch_dtype)
    norm.weight.data = random(576, generator=generator, dtype=torch_dtype)
    x = random(8, 576, generator=generator, dtype=torch_dtype, scale=3.0)
    with torch.inference_mode():
        expected = norm(x)
        got = row_kernels.library.rms_norm(x, norm.weight, norm.variance_epsilon)
        alone = row_kernels.library.rms_norm(x[5:6].contiguous(), norm.weight, norm.variance_epsilon)
    assert got.dtype == torch_dtype and torch.equal(alone[0], got[5])
    # The same maths, the mean summed in another order: float32 to rounding, bfloat16 within one step of it.
    tolerance = 1e-6 if torch_dtype == torch.float32 else 2**-7
    assert (got.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_decode_steps_attention_on_the_row_kernels_is_torchs_maths(row_kernels, dtype, window):
    """Each row writes its key and value and attends over its own keys (a sliding window's last ones);
    padding rows give zeros. Against the float32 torch path, to rounding."""
    torch_dtype = DTYPES[dtype][0]
    generator = torch.Generator().manual_seed(4)
    lengths, kv_heads, heads, dim = [3, 17, 9], 3, 9, 64

    def rows() -> list[RowKV]:  # the same keys each time
        keys_of = torch.Generator().manual_seed(5)
        made = []
        for length in lengths:
            row = RowKV(32)
            row.append(
                0, *(random(kv_heads, length, dim, generator=keys_of, dtype=torch_dtype) for _ in "kv")
            )
            made.append(row)
        return made

    query = random(4, heads, dim, generator=generator, dtype=torch_dtype)  # 3 rows and one of padding
    keys, values = (random(4, kv_heads, dim, generator=generator, dtype=torch_dtype) for _ in "kv")
    theirs_rows, ours_rows = rows(), rows()
    theirs = batch_cache.decode_attention(theirs_rows, 0, query, keys, values, 0.125, window)
    ours = batch_cache.decode_attention(
        ours_rows, 0, query, keys, values, 0.125, window, row_kernels.library.attend_rows
    )
    assert ours.shape == theirs.shape == (4, heads * dim) and ours.dtype == torch_dtype
    assert torch.equal(ours[3], torch.zeros_like(ours[3]))
    tolerance = 1e-5 if torch_dtype == torch.float32 else 1e-2
    assert (ours.float() - theirs.float()).abs().max() <= tolerance * theirs.float().abs().max()
    for mine, reference in zip(ours_rows, theirs_rows, strict=True):  # the new key and value went in
        assert mine.length == reference.length
        assert all(torch.equal(a, b) for a, b in zip(mine.view(0), reference.view(0), strict=True))


def test_work_between_replies_waits_until_no_reply_is_decoding(demo_tokenizer, watch_forwards, monkeypatch):
    """Moving kernels mid-reply would give that reply numbers from two kernels: it waits for the batch to
    empty, and runs before a request that waits (the engine held mid-reply by its second decode step)."""
    no_early_end(monkeypatch)
    model = tiny_llama(torch.float32)
    engine = Engine(model, demo_tokenizer, EngineLimits(max_batch_size=2, max_queue=4, idle_seconds=0.05))
    forwards = watch_forwards(model, hold_at=2, stats=engine.stats)
    seen: list[tuple[int, int]] = []
    ran = threading.Event()

    def task():
        seen.append(engine.stats())  # (requests decoding, requests waiting) when it runs
        ran.set()

    settings = GenerationSettings(seed=1, max_new_tokens=6, mode="greedy", repetition_penalty=1.0)
    try:
        reply = engine.submit([1, 5, 9], settings)
        forwards.wait_held()
        engine.between_replies(task)
        assert not ran.is_set()
        forwards.go_on.set()
        updates = list(reply)
        assert ran.wait(HANG)
        assert seen == [(0, 0)]
        assert updates[-1].finished and updates[-1].new_tokens == 6  # the reply ran out whole first
        wait_until_idle(engine)
        engine.between_replies(task)  # an idle engine: at once, on a thread of its own that ends
        ran.clear()
        assert ran.wait(HANG) and len(seen) == 2
    finally:
        engine.close()


def test_a_model_loaded_before_its_kernels_are_built_moves_to_them_between_replies(
    demo_text_dir, row_kernels, tmp_path, caplog
):
    """The app's cold start: the build runs while the model serves on oneDNN; the banner and the System
    tab say so; once built, the model moves before the next reply and the fused step runs on them."""
    gate = threading.Event()

    def builder(directory):
        assert gate.wait(HANG), "the build was never let finish"
        return row_kernels

    build = KernelBuild(tmp_path, builder=builder).start()
    assert build.building and not build.was_cached
    holder = ModelHolder(ModelSpec(name=str(demo_text_dir), dtype="bfloat16", kernel_build=build))
    holder.load()
    loaded = holder.get()
    assert loaded.kernels.startswith("oneDNN packed weights: on") and loaded.awaiting_kernels is build
    assert holder.kernels_state() == "building"
    assert "row kernels building" in holder.info().kernels
    assert "Building faster CPU kernels for the chat model" in banner_markdown([("chat", holder)])
    chat = ChatService(
        holder, ServerLimits(), EngineLimits(max_batch_size=2, idle_seconds=0.05), RequestStats()
    )
    settings = GenerationSettings(seed=7, max_new_tokens=4, mode="greedy", repetition_penalty=1.0)
    assert list(chat.chat("Hello", [], settings))[-1].done
    assert chat.decode_path() == "fused (oneDNN post-ops on packed weights)"
    gate.set()
    caplog.set_level(logging.INFO, logger="backend.services.model_engine")
    assert build.kernels(wait=HANG) is row_kernels
    wait_until_idle(chat._engines.get(loaded, loaded.model))  # the move ran on the idle engine's thread
    assert holder.kernels_state() == "on"
    assert loaded.awaiting_kernels is None
    assert holder.info().kernels.startswith(f"{ROW_KERNELS} on packed weights: on (")
    assert "moved from oneDNN" in holder.info().kernels
    assert "Faster CPU kernels on for the chat model" in banner_markdown([("chat", holder)])
    layers = [m for m in loaded.model.modules() if type(m) is PackedLinear]
    assert layers and all(type(m.packed) is RowsWeight for m in layers)
    assert list(chat.chat("Hello", [], settings))[-1].done
    assert chat.decode_path() == "fused (row kernels' post-ops on packed weights)"
    moved = [r.getMessage() for r in caplog.records if "moved to the row kernels" in r.getMessage()]
    assert moved and moved[0].endswith("; decode step: fused (row kernels' post-ops on packed weights)")


def test_a_build_a_killed_process_left_unfinished_does_not_block_the_next(row_kernels):
    """torch's build lock is a file; one left behind by a process killed mid-build must not hang the app."""
    directory = default_cache_root() / "kernels"
    (directory / library_name() / "lock").touch()
    build = KernelBuild(directory).start()
    assert build.kernels(wait=HANG) is not None, build.text()
    assert not (directory / library_name() / "lock").exists()


def test_where_the_kernels_cannot_be_built_the_app_says_why_and_serves_on_onednn(
    demo_text_dir, row_kernels, monkeypatch, tmp_path
):
    off = KernelBuild(tmp_path, enabled=False).start()
    assert (
        off.kernels() is None
        and not off.building
        and off.text() == "row kernels unavailable: off (--no-row-kernels)"
    )
    monkeypatch.setattr("shutil.which", lambda *args, **kwargs: None)  # no compiler, no ninja
    missing = KernelBuild(tmp_path).start()
    assert missing.kernels() is None and "no C++ compiler" in missing.text()

    def failing(directory):
        raise RuntimeError("Error building extension 'playground_rows'\nc++: fatal error: killed")

    monkeypatch.undo()
    failed = KernelBuild(tmp_path, builder=failing).start()
    assert failed.kernels(wait=HANG) is None and not failed.building
    assert failed.text() == "row kernels unavailable: the build failed (c++: fatal error: killed)"
    for build in (off, failed):  # the System tab's Kernels line says why
        holder = ModelHolder(ModelSpec(name=str(demo_text_dir), dtype="bfloat16", kernel_build=build))
        holder.load()
        assert holder.info().kernels == (f"oneDNN packed weights: on (15 linear layers); {build.text()}")
        assert holder.kernels_state() is None


@pytest.mark.parametrize(
    "argv, env, on",
    [([], {}, True), (["--no-row-kernels"], {}, False), ([], {"PLAYGROUND_NO_ROW_KERNELS": "1"}, False)],
    ids=["default", "flag", "variable"],
)
def test_the_flag_and_its_variable_keep_the_app_on_onednn(row_kernels, argv, env, on):
    from app import local_services
    from backend.config import parse_config

    config = parse_config(argv, has_gpu=False, env=env)
    assert config.placement.row_kernels is on
    chat, images, holders = local_services(config, load_in_background=False, stats=RequestStats())
    for holder in holders:  # the chat model and the vision model: the app's cache is warm (conftest)
        kernels = holder.info().kernels
        if on:
            assert kernels.startswith(f"{ROW_KERNELS} on packed weights: on"), kernels
        else:
            assert kernels.endswith("; row kernels unavailable: off (--no-row-kernels)"), kernels
