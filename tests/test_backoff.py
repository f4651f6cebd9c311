"""The one wait schedule for a database that is away: doubling waits, a cap, a limit."""

from __future__ import annotations

from hpo.search.outages import Backoff


def test_waits_double_up_to_the_cap():
    backoff = Backoff(limit_s=3600, first=0.5, cap=8.0)
    assert [backoff.next_wait() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_jitter_stays_within_a_quarter_either_way():
    backoff = Backoff(limit_s=3600, first=1.0, cap=1000.0, jitter=True)
    waits = [backoff.next_wait() for _ in range(6)]
    assert waits[0] == 1.0
    for before, after in zip(waits, waits[1:]):
        assert before is not None and after is not None and 0.75 * 2 * before <= after <= 1.25 * 2 * before


def test_no_wait_once_the_limit_has_passed():
    backoff = Backoff(limit_s=3600)
    backoff.started -= 3601  # as if the first failure was an hour ago
    assert backoff.next_wait() is None


def test_clip_keeps_the_last_wait_inside_the_limit():
    backoff = Backoff(limit_s=10, first=8.0, clip=True)
    backoff.started -= 9  # one second left
    wait = backoff.next_wait()
    assert wait is not None and 0 < wait <= 1.0
