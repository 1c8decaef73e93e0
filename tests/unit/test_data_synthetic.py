"""synthetic://markov: deterministic shards whose entropy rate is what the docstring promises."""
import numpy as np
import pytest

from orchestrator.data import DataError
from orchestrator.data.shards import BOS
from orchestrator.data.synthetic import MarkovParams, MarkovSource

SMALL = "synthetic://markov?seed=3&states=64&branch=4&doc_len=32&shard_tokens=200000"


def _nll(src: MarkovSource, tokens: np.ndarray) -> np.ndarray:
    """-log P(next | previous) of each transition under the true chain."""
    P = src.transition_matrix().tocsr()
    index = np.full(1 << 16, -1)
    index[BOS] = 0
    index[src.token_ids] = 1 + np.arange(src.params.states)
    a, b = index[tokens[:-1].astype(np.int64)], index[tokens[1:].astype(np.int64)]
    assert (a >= 0).all() and (b >= 0).all()
    return -np.log(np.asarray(P[a, b]).ravel())


def test_same_url_gives_identical_shards_and_different_seeds_differ():
    a = MarkovSource.from_url(SMALL).generate("train", 1)
    b = MarkovSource.from_url(SMALL).generate("train", 1)
    c = MarkovSource.from_url(SMALL.replace("seed=3", "seed=4")).generate("train", 1)
    assert a.dtype == np.uint16 and a.size == 200_000
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, MarkovSource.from_url(SMALL).generate("val", 0))


def test_known_bytes_pin_the_generator_across_machines():
    # if this changes, every staged synthetic shard's sha256 changes: bump it only on purpose
    x = MarkovSource.from_url("synthetic://markov?seed=0&shard_tokens=4096").generate("train", 1)
    assert x[:6].tolist() == [50256, 48861, 46299, 39944, 33527, 15867]
    assert int(x.astype(np.int64).sum()) == 101_360_774


def test_documents_open_with_bos_and_have_the_requested_mean_length():
    src = MarkovSource.from_url(SMALL)
    x = src.generate("train", 2)
    assert x[0] == BOS
    starts = np.flatnonzero(x == BOS)
    assert abs(np.diff(starts).mean() - 33) < 1.5  # doc_len content tokens + the BOS
    assert set(np.unique(x)) <= set(src.token_ids.tolist()) | {BOS}


def test_stationary_distribution_is_a_fixed_point():
    src = MarkovSource.from_url(SMALL)
    P = src.transition_matrix()
    assert np.allclose(np.asarray(P.sum(axis=1)).ravel(), 1.0)
    pi = src.stationary()
    assert np.abs(pi @ P - pi).max() < 1e-12 and abs(pi.sum() - 1) < 1e-12


def test_entropy_rate_matches_the_mean_log_loss_of_generated_text():
    src = MarkovSource.from_url(SMALL)
    nll = _nll(src, src.generate("train", 1))
    stderr = nll.std() / np.sqrt(nll.size)
    assert abs(nll.mean() - src.entropy_rate_nats) < 5 * stderr + 1e-3
    assert 0 < src.entropy_rate_nats < np.log(50257)


def test_entropy_rate_of_a_uniform_chain_has_a_closed_form():
    # branch = 1 and doc_len = 1: every document is BOS + one uniform token, so H = log(states) / 2
    src = MarkovSource.from_url("synthetic://markov?states=100&branch=1&doc_len=1")
    assert src.entropy_rate_nats == pytest.approx(np.log(100) / 2, rel=1e-12)


@pytest.mark.parametrize("url, words", [
    ("synthetic://markov?state=5", "did you mean 'states'"),
    ("synthetic://markov?states=abc", "not an integer"),
    ("synthetic://markov?states=1", "out of range"),
    ("synthetic://markov?states=8&branch=9", "exceeds states"),
    ("synthetic://zipf", "unknown synthetic source"),
])
def test_bad_urls_get_one_clear_sentence(url, words):
    with pytest.raises(DataError, match=words):
        MarkovParams.from_url(url)


def test_defaults_round_trip_through_the_url():
    p = MarkovParams.from_url("synthetic://markov")
    assert MarkovParams.from_url(p.url()) == p
    assert p.states == 512 and p.train_shards == 2 and p.val_shards == 1
