"""The queue's one decision, as a table: (reply, age, attempts, policy) -> outcome and wait."""

from __future__ import annotations

import pytest

from common.reply import Reply
from mta.queue import STATE_AFTER, Outcome, Policy, classify

POLICY = Policy([60.0, 300.0, 900.0], max_queue_lifetime=3600.0, delay_warning=600.0,
                local_retry_schedule=[1.0, 2.0])

OK = Reply(250, "2.0.0", "Ok")
FULL = Reply(452, "4.2.2", "Mailbox full")
AWAY = Reply(451, "4.4.1", "Cannot connect")
UNKNOWN = Reply(550, "5.1.1", "No such user")


@pytest.mark.parametrize(
    ("reply", "age", "attempts", "mda_away", "outcome", "wait"),
    [
        (OK, 0.0, 1, False, Outcome.DELIVERED, 0.0),
        (OK, 99999.0, 7, False, Outcome.DELIVERED, 0.0),  # late but delivered is delivered
        (UNKNOWN, 0.0, 1, False, Outcome.BOUNCED, 0.0),
        (UNKNOWN, 99999.0, 1, False, Outcome.BOUNCED, 0.0),
        (FULL, 0.0, 1, False, Outcome.DEFERRED, 60.0),
        (FULL, 10.0, 2, False, Outcome.DEFERRED, 300.0),
        (FULL, 10.0, 3, False, Outcome.DEFERRED, 900.0),
        (FULL, 10.0, 9, False, Outcome.DEFERRED, 900.0),  # the last step repeats
        (FULL, 3599.0, 2, False, Outcome.DEFERRED, 300.0),
        (FULL, 3600.0, 2, False, Outcome.EXPIRED, 0.0),  # lifetime reached
        (AWAY, 0.0, 1, True, Outcome.DEFERRED, 1.0),  # our MDA restarting: the short schedule
        (AWAY, 0.0, 5, True, Outcome.DEFERRED, 2.0),
        (AWAY, 3600.0, 1, True, Outcome.EXPIRED, 0.0),
    ],
)
def test_classify(reply: Reply, age: float, attempts: int, mda_away: bool, outcome: Outcome, wait: float) -> None:
    assert classify(reply, age, attempts, POLICY, mda_away=mda_away) == (outcome, wait)


def test_every_outcome_leaves_a_state() -> None:
    assert {o: STATE_AFTER[o] for o in Outcome} == {
        Outcome.DELIVERED: "delivered", Outcome.BOUNCED: "bounced", Outcome.EXPIRED: "expired",
        Outcome.DEFERRED: "queued",
    }


@pytest.mark.parametrize(
    ("age", "attempts", "warned", "wait"),
    [
        (10.0, 3, False, 590.0),  # 900 s by the schedule, but the warning is due at 600 s
        (500.0, 1, False, 60.0),  # the schedule comes first anyway
        (10.0, 3, True, 900.0),  # warned already: the schedule alone
        (650.0, 3, False, 900.0),  # past the warning time: it goes with this attempt
    ],
)
def test_the_next_try_of_an_unwarned_message_comes_when_the_warning_is_due(
    age: float, attempts: int, warned: bool, wait: float
) -> None:
    assert classify(FULL, age, attempts, POLICY, warned=warned) == (Outcome.DEFERRED, wait)
