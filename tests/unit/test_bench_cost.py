"""bench.cost: the background CPU a process spends per request of another side's measurement."""

from __future__ import annotations

from bench.cost import Cost


def test_background_is_the_idle_rate_times_the_other_sides_time_per_request() -> None:
    # While 100 reads went direct over 10 s the gateway used 0.5 ms per read: 5 ms per second.
    direct = Cost(100, {}, {"gateway": 0.5}, 10.0)
    # Through the gateway 100 reads took 5 s: 50 ms each, of which 0.25 ms is that background.
    through = Cost(100, {}, {"gateway": 3.0}, 5.0)
    assert direct.background_ms("gateway", through) == 0.25
    assert direct.background_ms("records", through) == 0.0  # a process that used no CPU
    assert Cost(100, {}, {"gateway": 0.5}).background_ms("gateway", through) == 0.0  # no time known
