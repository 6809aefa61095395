from __future__ import annotations

import math

import pytest
import torch

from backend.decode.sampling import (
    build_logits_processor,
    choose_next_token,
    is_greedy,
    make_generator,
    mask_unknown_tokens,
)
from backend.settings import GenerationSettings

CPU = torch.device("cpu")
PLAIN = GenerationSettings(mode="sample", temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)


def settings(**changes) -> GenerationSettings:
    return GenerationSettings(**{**PLAIN.to_dict(), "stop_words": (), **changes})


def process(s: GenerationSettings, scores: torch.Tensor, input_ids: list[int] | None = None) -> torch.Tensor:
    ids = torch.tensor([input_ids if input_ids is not None else [0]], dtype=torch.long)
    return build_logits_processor(s)(ids.expand(scores.shape[0], -1), scores.clone())


def kept(scores: torch.Tensor) -> set[int]:
    return {int(i) for i in torch.nonzero(torch.isfinite(scores[0])).flatten()}


def test_plain_sampling_leaves_scores_alone() -> None:
    scores = torch.randn(1, 20, generator=torch.Generator().manual_seed(0))
    assert len(build_logits_processor(PLAIN)) == 0
    assert torch.equal(process(PLAIN, scores), scores)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_keeps_exactly_k(k: int) -> None:
    scores = torch.randn(1, 30, generator=torch.Generator().manual_seed(k))
    out = process(settings(top_k=k), scores)
    expected = set(torch.argsort(scores[0], descending=True)[:k].tolist())
    assert kept(out) == expected
    assert torch.equal(out[0, sorted(expected)], scores[0, sorted(expected)])


def test_top_k_zero_and_top_p_one_disable() -> None:
    scores = torch.randn(1, 30, generator=torch.Generator().manual_seed(1))
    assert kept(process(settings(top_k=0, top_p=1.0), scores)) == set(range(30))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_keeps_smallest_set_reaching_p(p: float) -> None:
    probs = torch.tensor([0.02, 0.31, 0.07, 0.25, 0.12, 0.16, 0.04, 0.03])
    scores = probs.log().unsqueeze(0)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    expected, total = set(), 0.0
    for index in order:
        expected.add(index)
        total += float(probs[index])
        if total >= p:
            break
    assert kept(process(settings(top_p=p), scores)) == expected


def test_top_k_then_top_p_order() -> None:
    # top_k=3 renormalises to [0.4, 0.3, 0.2]/0.9; top_p=0.7 then keeps the first two (0.44 + 0.33).
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = process(settings(top_k=3, top_p=0.7), probs.log().unsqueeze(0))
    assert kept(out) == {0, 1}


def test_temperature_divides_logits() -> None:
    scores = torch.tensor([[2.0, -1.0, 0.5, 4.0]])
    assert torch.allclose(process(settings(temperature=2.0), scores), scores / 2.0)
    assert torch.allclose(process(settings(temperature=0.25), scores), scores * 4.0)


def test_small_temperature_approaches_argmax() -> None:
    scores = torch.tensor([[1.0, 2.5, 2.0, -3.0, 0.0]])
    probs = torch.softmax(process(settings(temperature=0.01), scores), dim=-1)
    assert probs[0, 1] > 1 - 1e-6
    batch = scores.expand(2000, -1)
    picks = choose_next_token(
        process(settings(temperature=0.01), batch), settings(temperature=0.01), make_generator(0, CPU)
    )
    assert set(picks.tolist()) == {1}
    # At temperature 1 the same logits do give other tokens.
    picks = choose_next_token(process(PLAIN, batch), PLAIN, make_generator(0, CPU))
    assert len(set(picks.tolist())) > 1


def test_temperature_zero_in_sample_mode_is_greedy() -> None:
    zero = settings(temperature=0.0, top_k=2, top_p=0.5)
    assert is_greedy(zero)
    assert is_greedy(settings(mode="greedy", temperature=1.5))
    assert not is_greedy(PLAIN)
    assert not is_greedy(settings(mode="beam", temperature=0.0))
    assert len(build_logits_processor(zero)) == 0  # no division by zero, no truncation
    scores = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    picks = choose_next_token(process(zero, scores), zero, None)
    assert picks.tolist() == [int(row.argmax()) for row in scores]


def test_greedy_keeps_only_repetition_penalty() -> None:
    s = settings(mode="greedy", repetition_penalty=2.0, temperature=0.5, top_k=1)
    scores = torch.tensor([[3.0, -2.0, 1.0, 0.5]])
    out = process(s, scores, input_ids=[0, 1])
    assert torch.allclose(out, torch.tensor([[1.5, -4.0, 1.0, 0.5]]))  # positive / 2, negative * 2
    assert len(build_logits_processor(s)) == 1
    assert choose_next_token(out, s, None).item() == 0  # 1.5 still beats the unpenalised 1.0


def test_sampling_frequencies_follow_renormalised_top_k() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    s = settings(top_k=2)
    n = 20_000
    picks = choose_next_token(process(s, probs.log().expand(n, -1)), s, make_generator(5, CPU))
    counts = torch.bincount(picks, minlength=4).double() / n
    assert counts[2] == 0 and counts[3] == 0
    assert math.isclose(float(counts[0]), 4 / 7, abs_tol=0.02)


def test_mask_unknown_tokens_never_picks_padding_ids() -> None:
    vocab_size = 6
    scores = torch.zeros(3000, 10)
    scores[:, 8] = 50.0  # the model "likes" a padded id most
    original = scores.clone()
    masked = mask_unknown_tokens(scores, vocab_size)
    assert torch.equal(scores, original)  # the caller's tensor is not changed
    assert torch.isinf(masked[:, vocab_size:]).all() and (masked[:, vocab_size:] < 0).all()
    assert torch.equal(masked[:, :vocab_size], original[:, :vocab_size])
    picks = choose_next_token(masked, PLAIN, make_generator(1, CPU))
    assert int(picks.max()) < vocab_size
    assert len(set(picks.tolist())) == vocab_size  # uniform over the real ids
    greedy = settings(mode="greedy")
    masked[:, 4] = 1.0
    assert set(choose_next_token(masked, greedy, None).tolist()) == {4}


def test_mask_unknown_tokens_without_padding_is_identity() -> None:
    scores = torch.randn(1, 6)
    assert mask_unknown_tokens(scores, 6) is scores
    assert mask_unknown_tokens(scores, 10) is scores


def draw(seed: int, count: int = 30) -> list[int]:
    generator = make_generator(seed, CPU)
    scores = torch.zeros(1, 100)
    return [int(choose_next_token(scores, PLAIN, generator)) for _ in range(count)]


def test_same_seed_same_samples_independent_of_global_rng() -> None:
    torch.manual_seed(1)
    first = draw(1234)
    torch.manual_seed(999)
    torch.rand(17)
    second = draw(1234)
    assert first == second
    assert draw(1235) != first


def test_request_generator_does_not_touch_global_rng() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    draw(42)
    assert torch.equal(torch.rand(3), expected)


def test_two_generators_are_independent() -> None:
    alone = draw(10)
    a, b = make_generator(10, CPU), make_generator(11, CPU)
    scores = torch.zeros(1, 100)
    interleaved = []
    for _ in range(30):
        interleaved.append(int(choose_next_token(scores, PLAIN, a)))
        choose_next_token(scores, PLAIN, b)
    assert interleaved == alone


@pytest.mark.parametrize("top_k, top_p", [(50, 0.9), (5, 0.5), (1, 0.95), (2000, 0.8), (40, 0.999)])
def test_top_p_within_top_k_matches_transformers_chain(top_k, top_p) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(4, 1000, generator=torch.Generator().manual_seed(top_k)) * 3
    ids = torch.zeros((4, 1), dtype=torch.long)
    theirs = TopPLogitsWarper(top_p)(ids, TopKLogitsWarper(top_k)(ids, scores.clone()))
    ours = process(settings(top_k=top_k, top_p=top_p), scores)
    assert torch.equal(ours.isinf(), theirs.isinf())
    assert torch.equal(ours[~ours.isinf()], theirs[~theirs.isinf()])


def test_draws_follow_top_k_and_top_p_together_and_never_pick_a_removed_token() -> None:
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    s = settings(top_k=4, top_p=0.7)  # top-4, then the smallest set reaching 0.7: ids 0, 1, 2
    n = 20_000
    picks = choose_next_token(process(s, probs.log().expand(n, -1)), s, make_generator(9, CPU))
    counts = torch.bincount(picks, minlength=6).double() / n
    assert counts[3:].sum() == 0
    assert math.isclose(float(counts[0]), 0.35 / 0.8, abs_tol=0.02)
    assert math.isclose(float(counts[2]), 0.2 / 0.8, abs_tol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_the_raw_distribution_over_known_tokens_in_every_dtype(dtype) -> None:
    """What /v1 reports: log-softmax of the raw logits (computed in float32 whatever the model's dtype),
    over the tokenizer's tokens only, with the likeliest `top` listed best first."""
    from backend.decode.generation import with_logprobs
    from backend.token_probs import TokenChoice

    class Tokenizer:
        def __len__(self):
            return 64

        def decode(self, ids, **kwargs):
            return "".join(f"<{i}>" for i in ids)

    logits = (torch.randn(72, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    logits[70:] = 50.0  # rows past the tokenizer's 64 tokens, as a padded embedding has: never listed
    token = with_logprobs(TokenChoice(5, "<5>", 0.1, ()), Tokenizer(), logits, 64, top=3)
    expected = torch.log_softmax(logits[:64].float(), dim=-1)
    assert token.logprob == pytest.approx(float(expected[5]), abs=1e-6)
    best = torch.topk(expected, 3)
    assert [entry[0] for entry in token.top_logprobs] == best.indices.tolist()
    assert [entry[2] for entry in token.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-6)
    assert token.top_logprobs[0][1] == f"<{best.indices[0]}>"
    assert with_logprobs(TokenChoice(5, "<5>", 0.1, ()), Tokenizer(), logits, 64, top=0).top_logprobs == ()
