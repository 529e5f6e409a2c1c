"""The retry delays: bounds, growth, reset, jitter, and the policies' validation (no timing)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from squadbus.core import backoff as named
from squadbus.core.backoff import Backoff, BackoffPolicy
from squadbus.core.errors import ConfigError


def test_without_jitter_the_delays_double_up_to_the_cap_and_stay_there() -> None:
    backoff = Backoff(BackoffPolicy(0.05, 1.0, jitter=0.0))
    assert [backoff.next() for _ in range(8)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert backoff.failures == 8


def test_reset_starts_over_at_the_first_delay() -> None:
    backoff = Backoff(BackoffPolicy(0.1, 5.0, jitter=0.0))
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert backoff.failures == 0
    assert [backoff.next(), backoff.next()] == pytest.approx([0.1, 0.2])


def test_a_draw_of_zero_gives_the_full_delay_and_a_draw_near_one_shortens_it_by_the_jitter() -> None:
    policy = BackoffPolicy(0.2, 2.0, jitter=0.5)
    assert Backoff(policy, rand=lambda: 0.0).next() == pytest.approx(0.2)
    assert Backoff(policy, rand=lambda: 0.999999).next() == pytest.approx(0.1, rel=1e-5)
    full = BackoffPolicy(0.2, 2.0, jitter=1.0)
    assert Backoff(full, rand=lambda: 0.5).next() == pytest.approx(0.1)


def test_the_same_random_source_gives_the_same_delays() -> None:
    policy = named.RECONNECT
    first = Backoff(policy, rand=random.Random(7).random)
    second = Backoff(policy, rand=random.Random(7).random)
    other = Backoff(policy, rand=random.Random(8).random)
    a = [first.next() for _ in range(10)]
    assert a == [second.next() for _ in range(10)]
    assert a != [other.next() for _ in range(10)]  # jittered: two clients do not retry in lockstep


@given(
    initial=st.floats(1e-4, 10.0), spread=st.floats(1.0, 1000.0), factor=st.floats(1.0, 4.0),
    jitter=st.floats(0.0, 1.0), seed=st.integers(0, 2**32), count=st.integers(1, 60),
)
def test_every_delay_lies_within_its_bounds(initial: float, spread: float, factor: float, jitter: float,
                                            seed: int, count: int) -> None:
    policy = BackoffPolicy(initial, initial * spread, factor=factor, jitter=jitter)
    source = random.Random(seed)
    backoff = Backoff(policy, rand=source.random)
    unjittered = Backoff(BackoffPolicy(initial, initial * spread, factor=factor, jitter=0.0))
    replay = random.Random(seed)
    for n in range(count):
        ceiling = unjittered.next()
        delay = backoff.next()
        assert 0 <= delay <= policy.maximum
        assert ceiling * (1 - jitter) - 1e-12 <= delay <= ceiling
        assert delay == pytest.approx(policy.delay(n, replay.random()))


def test_the_uncapped_steps_grow_and_the_pure_delay_survives_huge_failure_counts() -> None:
    policy = BackoffPolicy(0.01, 30.0, jitter=0.0)
    steps = [policy.delay(n, 0.0) for n in range(20)]
    assert all(a < b for a, b in itertools.pairwise(steps[:12]))
    assert steps[-1] == 30.0
    assert policy.delay(10**6, 0.0) == 30.0  # no float overflow after a long outage
    assert BackoffPolicy(0.1, 1.0, factor=1.0, jitter=0.0).delay(10**9, 0.0) == 0.1


@pytest.mark.parametrize(("args", "words"), [
    ((0.0, 1.0), "initial"), ((2.0, 1.0), "initial <= maximum"), ((-1.0, 1.0), "initial"),
])
def test_a_policy_without_a_positive_start_below_its_cap_is_refused(args: tuple[float, float], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        BackoffPolicy(*args)


def test_a_shrinking_factor_or_a_jitter_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="factor"):
        BackoffPolicy(0.1, 1.0, factor=0.5)
    with pytest.raises(ConfigError, match="jitter"):
        BackoffPolicy(0.1, 1.0, jitter=1.5)


def test_the_named_policies_are_valid_and_keep_their_documented_start_and_cap() -> None:
    assert (named.RECONNECT.initial, named.RECONNECT.maximum) == (0.05, 2.0)
    assert (named.WRITE_RETRY.initial, named.WRITE_RETRY.maximum) == (0.05, 1.0)
    for name in named.__all__:
        value = getattr(named, name)
        if isinstance(value, BackoffPolicy):
            assert 0 < value.initial <= value.maximum and 0 <= value.jitter <= 1


async def test_sleep_returns_the_delay_it_slept_and_advances() -> None:
    backoff = Backoff(BackoffPolicy(0.001, 0.004, jitter=0.0))
    assert await backoff.sleep() == pytest.approx(0.001)
    assert await backoff.sleep() == pytest.approx(0.002)
    assert backoff.failures == 2
