"""swarm.model.sampling: greedy, seeds, temperature, top-k/top-p/min-p (allowed sets computed independently
with numpy), sampling frequencies against softmax, the HF/CTRL repetition penalty, and the stop rules."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from swarm.model.sampling import Sampler, SamplingParams, StopChecker, apply_repetition_penalty


def draw(params: SamplingParams, logits, n: int, history=()) -> list[int]:
    sampler = Sampler(params, context=history)
    logits = mx.array(np.asarray(logits, dtype=np.float32))
    return [sampler(logits) for _ in range(n)]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# --- greedy and seeds ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = np.random.default_rng(seed).normal(0, 3, size=(1, 1000)).astype(np.float32)
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        x = mx.array(logits).astype(dtype)
        expected = int(np.argmax(np.array(x.astype(mx.float32))))
        assert Sampler(SamplingParams())(x) == expected


def test_greedy_ties_go_to_the_lowest_id_as_mx_argmax():
    logits = mx.array([0.0, 5.0, 1.0, 5.0, 5.0])
    assert Sampler(SamplingParams(temperature=0.0))(logits) == 1 == mx.argmax(logits).item()


def test_top_k_one_is_greedy_at_any_temperature():
    logits = np.random.default_rng(1).normal(size=300)
    assert set(draw(SamplingParams(temperature=1.5, top_k=1, seed=3), logits, 20)) == {int(np.argmax(logits))}


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = np.zeros(50)
    first = draw(SamplingParams(temperature=1.0, seed=7), logits, 64)
    sampler, again = Sampler(SamplingParams(temperature=1.0, seed=7)), []
    for _ in range(64):
        mx.random.seed(123)  # MLX's global random state must not matter
        mx.random.uniform(shape=(3,))
        again.append(sampler(mx.array(logits, dtype=mx.float32)))
    assert again == first
    assert draw(SamplingParams(temperature=1.0, seed=8), logits, 64) != first
    assert len(set(first)) > 20  # it samples at all
    assert draw(SamplingParams(temperature=1.0), logits, 64) != draw(SamplingParams(temperature=1.0), logits, 64)


def test_same_seed_same_tokens_with_filters():
    logits = np.random.default_rng(2).normal(size=100)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=11)
    assert draw(params, logits, 50) == draw(params, logits, 50)


# --- filters against numpy ----------------------------------------------------------------------------------

def allowed_top_k(p: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-p, kind="stable")[:k].tolist()) if k > 0 else set(range(len(p)))


def top_p_margin_and_set(p: np.ndarray, top_p: float) -> tuple[float, set[int]]:
    """The smallest set of most likely tokens whose mass reaches top_p (with any token tied with its least
    likely member, which another sort order would take instead), and how close any cumulative mass came to
    top_p (a float32 run may decide differently right at the boundary)."""
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    kept = max(1, int(np.sum(before < top_p)))
    keep = set(np.flatnonzero(p >= p[order[kept - 1]] * (1 - 1e-9)).tolist())
    return float(np.min(np.abs(before[1:] - top_p))) if len(p) > 1 else 1.0, keep


logit_lists = st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=40)


@settings(max_examples=100, deadline=None)
@given(logits=logit_lists, top_p=st.floats(0.05, 0.99), temperature=st.sampled_from([0.5, 1.0, 1.7]),
       seed=st.integers(0, 2**31))
def test_top_p_never_picks_outside_the_nucleus(logits, top_p, temperature, seed):
    x = np.array(logits, dtype=np.float32).astype(np.float64)
    margin, allowed = top_p_margin_and_set(softmax(x / temperature), top_p)
    assume(margin > 1e-4)
    picked = draw(SamplingParams(temperature=temperature, top_p=top_p, seed=seed), logits, 4)
    assert set(picked) <= allowed


@settings(max_examples=100, deadline=None)
@given(logits=logit_lists, min_p=st.floats(0.01, 0.95), temperature=st.sampled_from([0.5, 1.0, 1.7]),
       seed=st.integers(0, 2**31))
def test_min_p_never_picks_a_token_below_min_p_times_the_top(logits, min_p, temperature, seed):
    p = softmax(np.array(logits, dtype=np.float32).astype(np.float64) / temperature)
    ratio = p / p.max()
    assume(np.min(np.abs(ratio - min_p)) > 1e-4)
    allowed = set(np.flatnonzero(ratio >= min_p).tolist())
    picked = draw(SamplingParams(temperature=temperature, min_p=min_p, seed=seed), logits, 4)
    assert set(picked) <= allowed


@settings(max_examples=80, deadline=None)
@given(logits=logit_lists, top_k=st.integers(1, 45), top_p=st.floats(0.05, 1.0), seed=st.integers(0, 2**31))
def test_top_k_then_top_p_never_picks_outside_both(logits, top_k, top_p, seed):
    x = np.array(logits, dtype=np.float32).astype(np.float64)
    top = allowed_top_k(x, top_k)
    assume(top_k >= len(x) or np.sort(x)[::-1][top_k - 1] - np.sort(x)[::-1][top_k] > 1e-6)  # no tie at k
    # top-p sees the distribution renormalised over the top k
    p = np.where(np.isin(np.arange(len(x)), list(top)), softmax(x), 0.0)
    margin, allowed = top_p_margin_and_set(p / p.sum(), top_p)
    assume(margin > 1e-4 or top_p == 1.0)
    picked = draw(SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=seed), logits, 4)
    assert set(picked) <= (allowed & top if top_p < 1.0 else top)


def test_filters_close_to_their_boundaries():
    # top-p: 0.5 + 0.3 falls short of 0.801, so the third token (0.2) is in; 0.799 is reached without it
    logits = np.log([0.5, 0.3, 0.2])
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.801, seed=0), logits, 200)) == {0, 1, 2}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.799, seed=0), logits, 200)) == {0, 1}
    # min-p: 0.2004 of the top is kept at min_p=0.2, 0.1996 is not
    logits = np.log([1.0, 0.2004, 0.1996])
    assert set(draw(SamplingParams(temperature=1.0, min_p=0.2, seed=0), logits, 200)) == {0, 1}


def test_degenerate_filters_keep_the_most_likely_token():
    logits = [0.0, 3.0, 1.0]
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.0, seed=1), logits, 10)) == {1}
    assert set(draw(SamplingParams(temperature=1.0, min_p=1.5, seed=1), logits, 10)) == {1}


# --- frequencies ----------------------------------------------------------------------------------------------

LOGITS = np.log(np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02]))
N = 2000


def chi_square(picked: list[int], expected_p: np.ndarray) -> float:
    counts = np.bincount(picked, minlength=len(expected_p))
    assert counts[expected_p == 0].sum() == 0
    exp = expected_p[expected_p > 0] * len(picked)
    return float((((counts[expected_p > 0] - exp) ** 2) / exp).sum())


def renormalised(p: np.ndarray, keep) -> np.ndarray:
    q = np.where(np.isin(np.arange(len(p)), list(keep)), p, 0.0)
    return q / q.sum()


# With at most 7 degrees of freedom a chi-square above 30 has probability under 1e-4; the seed is fixed, so a
# pass is a pass for good. A wrong distribution (temperature ignored, one token too many or too few) scores
# in the hundreds.
@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=1.0, seed=0), softmax(LOGITS)),
    (SamplingParams(temperature=0.5, seed=1), softmax(LOGITS / 0.5)),
    (SamplingParams(temperature=2.0, seed=2), softmax(LOGITS / 2.0)),
    (SamplingParams(temperature=1.0, top_k=3, seed=3), renormalised(softmax(LOGITS), {0, 1, 2})),
    (SamplingParams(temperature=1.0, top_p=0.6, seed=4), renormalised(softmax(LOGITS), {0, 1, 2})),  # .3+.2 < .6
    (SamplingParams(temperature=1.0, min_p=0.34, seed=5), renormalised(softmax(LOGITS), {0, 1, 2, 3})),
])
def test_sampling_frequencies_follow_the_filtered_softmax(params, expected):
    assert chi_square(draw(params, LOGITS, N), expected) < 30


# --- repetition penalty ---------------------------------------------------------------------------------------

def hf_repetition_penalty(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor, written out: divide where positive, multiply where not."""
    out = logits.copy()
    ids = np.unique(history)
    out[ids] = np.where(out[ids] < 0, out[ids] * penalty, out[ids] / penalty)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_repetition_penalty_matches_transformers_formula(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, size=200).astype(np.float32)
    history = rng.integers(0, 200, size=50).tolist()
    x = mx.array(logits)
    got = np.array(apply_repetition_penalty(x, history, 1.3, context=64))
    np.testing.assert_allclose(got, hf_repetition_penalty(logits, history, 1.3), rtol=1e-6)
    np.testing.assert_array_equal(np.array(x), logits)  # the caller's logits are left alone


def test_repetition_penalty_flips_the_argmax_where_it_should():
    greedy = SamplingParams(repetition_penalty=1.1)
    assert draw(greedy, [2.0, 1.9, 0.5], 1, history=[0]) == [1]  # 2.0 / 1.1 < 1.9
    assert draw(SamplingParams(repetition_penalty=1.04), [2.0, 1.9, 0.5], 1, history=[0]) == [0]  # 1.923 > 1.9
    assert draw(greedy, [-1.0, -1.05, -3.0], 1, history=[0]) == [1]  # negative: -1.0 * 1.1 < -1.05
    assert draw(greedy, [2.0, 1.9, 0.5], 1, history=[2]) == [0]  # an unseen token keeps its place
    assert draw(SamplingParams(), [2.0, 1.9, 0.5], 1, history=[0]) == [0]  # penalty 1: no change


def test_repetition_penalty_looks_back_only_over_its_context():
    history = [0] + [2] * 10
    assert draw(SamplingParams(repetition_penalty=1.1, repetition_context=11), [2.0, 1.9, 0.5], 1, history) == [1]
    assert draw(SamplingParams(repetition_penalty=1.1, repetition_context=10), [2.0, 1.9, 0.5], 1, history) == [0]


# --- stop rules -----------------------------------------------------------------------------------------------

def feed_all(checker: StopChecker, pieces, eos_at=None) -> tuple[list[str], str | None]:
    out, reason = [], None
    for k, piece in enumerate(pieces):
        text, reason = checker.feed(2 if k == eos_at else 100 + k, piece)
        out.append(text)
        if reason:
            break
    return out, reason


def test_a_stop_string_split_across_tokens_is_never_emitted():
    out, reason = feed_all(StopChecker(["<END>"], max_tokens=100), ["Hello", " wor", "ld<", "EN", "D>tail", "more"])
    assert out == ["Hello", " wor", "ld", "", ""] and reason == "stop"


def test_a_partial_match_that_is_not_a_stop_is_emitted():
    checker = StopChecker(["<END>", "\n\n"], max_tokens=100)
    out, reason = feed_all(checker, ["a<", "EN", "X b\n", "c", "<E"])
    assert out == ["a", "", "<ENX b", "\nc", ""] and reason is None
    assert checker.feed(7, "ND>") == ("", "stop")
    assert checker.feed(8, "late") == ("", "stop")  # finished stays finished


def test_the_earliest_stop_wins_and_the_text_before_it_is_kept():
    out, reason = feed_all(StopChecker(["cd", "bcdx"], max_tokens=100), ["ab", "cd", "x"])
    assert "".join(out) == "ab" and reason == "stop"  # "cd" completes first
    out, reason = feed_all(StopChecker(["cd", "bcdx"], max_tokens=100), ["ab", "cdx"])
    assert "".join(out) == "a" and reason == "stop"  # both complete in one piece: the one starting first
    out, reason = feed_all(StopChecker(["xyz", "b"], max_tokens=100), ["axyzb"])
    assert out == ["a"] and reason == "stop"


def test_eos_stops_and_releases_held_text():
    out, reason = feed_all(StopChecker(["<END>"], eos_ids=[2], max_tokens=100), ["Hi <", "E", ""], eos_at=2)
    assert out == ["Hi ", "", "<E"] and reason == "stop"


def test_max_tokens_is_length_and_releases_held_text():
    out, reason = feed_all(StopChecker(["<END>"], max_tokens=3), ["a", "b", "c<E", "never"])
    assert out == ["a", "b", "c<E"] and reason == "length"


def test_context_limit_is_length():
    checker = StopChecker(max_tokens=100, context_limit=13, prompt_tokens=10)
    assert [checker.feed(100 + k, "x") for k in range(3)] == [("x", None), ("x", None), ("x", "length")]
    unlimited = StopChecker(max_tokens=1000, context_limit=None, prompt_tokens=10**6)
    assert all(unlimited.feed(100, "x")[1] is None for _ in range(999))


@settings(max_examples=200, deadline=None)
@given(text=st.text("ab<>X\n", max_size=40), stops=st.lists(st.text("ab<>X\n", min_size=1, max_size=4),
       max_size=3), cuts=st.lists(st.integers(0, 40), max_size=12))
def test_stream_output_is_the_text_up_to_the_first_completed_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    out, reason = feed_all(StopChecker(stops, max_tokens=len(pieces)), pieces)
    # independent answer: the first piece boundary by which some stop is complete, then the earliest such stop
    ends = [text.find(s) + len(s) for s in stops if s in text]
    if not ends:
        assert "".join(out) == text and reason == "length"
        return
    boundary = next(b for b in bounds[1:] if b >= min(ends))
    first = min(text.find(s) for s in stops if s in text and text.find(s) + len(s) <= boundary)
    assert "".join(out) == text[:first] and reason == "stop"
    assert len(out) == bounds.index(boundary)  # it stopped on the piece that completed the stop


# --- penalties, logit_bias, log-probabilities, seeds across moves, ranges -------------------------------------

from collections import Counter  # noqa: E402

from swarm.model.sampling import SamplingError, apply_logit_bias, apply_penalties, log_probabilities  # noqa: E402


def test_presence_and_frequency_penalties_as_openai_defines_them():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=50).astype(np.float32)
    generated = [3, 3, 3, 7, 9, 9]
    got = np.array(apply_penalties(mx.array(logits), Counter(generated), presence=0.5, frequency=0.25))
    want = logits.copy()
    for token, count in Counter(generated).items():  # mu[j] - count[j] * frequency - (count[j] > 0) * presence
        want[token] -= count * 0.25 + 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert draw(SamplingParams(presence_penalty=2.0), [2.0, 1.9, 0.5], 2, history=[0]) == [0, 1]  # 0, then penalised


def test_logit_bias_adds_and_can_ban_or_force():
    logits = mx.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(np.array(apply_logit_bias(logits, {0: 5.0, 2: -1.5})), [6.0, 2.0, 1.5])
    assert draw(SamplingParams(logit_bias={2: -100.0}), [1.0, 2.0, 3.0], 1) == [1]
    assert set(draw(SamplingParams(temperature=1.0, seed=3, logit_bias={0: 100.0}), [1.0, 2.0, 3.0], 20)) == {0}


def test_log_probabilities_are_the_float32_log_softmax_of_the_raw_logits():
    logits = np.random.default_rng(5).normal(0, 4, size=300).astype(np.float32)
    want = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    sampler = Sampler(SamplingParams(logprobs=5, logit_bias={1: 50.0}), context=())
    choice = sampler.next(mx.array(logits))
    assert choice.token == 1  # chosen under the bias ...
    assert abs(choice.logprob - want[1]) < 1e-4  # ... but its logprob is the model's own
    top = np.argsort(-want)[:5]
    assert [t for t, _ in choice.top] == top.tolist()
    np.testing.assert_allclose([lp for _, lp in choice.top], want[top], atol=1e-4)
    assert sum(np.exp(lp) for _, lp in choice.top) <= 1.0
    token, lp_top = log_probabilities(mx.array(logits), 7, 0)
    assert abs(token - want[7]) < 1e-4 and lp_top == []


def test_a_moved_session_draws_what_it_would_have_drawn():
    """The draw at step n depends on (seed, n) alone: a sampler rebuilt at step 10 (a session moved to
    other nodes) goes on with the very tokens of the undisturbed one, penalties included."""
    rng = np.random.default_rng(6)
    logits = [mx.array(rng.normal(size=64).astype(np.float32)) for _ in range(20)]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, presence_penalty=0.3, repetition_penalty=1.2)
    prompt = [1, 2, 3]
    undisturbed = Sampler(params, context=prompt)
    tokens = [undisturbed(x) for x in logits]
    moved = Sampler(params, context=prompt + tokens[:10], step=10)
    assert [moved(x) for x in logits[10:]] == tokens[10:]
    assert len(set(tokens)) > 5


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.1), ("top_p", 1.5),
    ("top_p", -0.01), ("min_p", 2.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("seed", 2**70),
    ("seed", -1), ("max_tokens", 0), ("top_k", -1), ("logprobs", 21), ("repetition_penalty", 0.0),
    ("logit_bias", {600: 1.0}), ("logit_bias", {1: 101.0}), ("logit_bias", {1: float("nan")})])
def test_out_of_range_parameters_are_named(field, value):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{field: value}).check(vocab_size=512)
    assert e.value.param == ("top_logprobs" if field == "logprobs" else field)


def test_top_p_zero_keeps_only_the_most_likely_token():
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.0, seed=2).check(3), [0.0, 3.0, 2.9], 30)) == {1}


def test_sampling_params_travel_between_nodes_unchanged():
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.01, repetition_penalty=1.1,
                            repetition_context=32, presence_penalty=0.2, frequency_penalty=-0.1,
                            logit_bias={3: -2.0, 9: 1.5}, seed=99, logprobs=4,
                            grammar={"type": "regex", "pattern": "[a-z]+"})
    back = SamplingParams.from_wire(params.to_wire())
    assert back == SamplingParams(**{**params.__dict__, "max_tokens": back.max_tokens, "stop": back.stop})
