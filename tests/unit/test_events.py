"""The trace vocabulary: hop and event names are enums whose values are the stored words."""

from __future__ import annotations

from common.events import FINAL, EventName, Hop
from common.models import Event
from mta.queue import Outcome


def test_the_values_are_the_words_the_events_table_holds() -> None:
    # Rows written before the enums existed read back as members: no migration.
    assert [str(h) for h in Hop] == ["msa", "mta", "qmgr", "mda", "admin"]
    assert [str(e) for e in EventName] == [
        "received", "relayed", "queued", "resubmitted", "delivered", "refused", "deferred", "bounced", "expired",
        "dsn", "held", "released", "deleted", "filtered", "changed",
    ]
    assert Hop("qmgr") is Hop.QMGR and EventName("dsn") is EventName.DSN
    assert EventName.DELIVERED == "delivered" and f"{Hop.MDA}/{EventName.REFUSED}" == "mda/refused"


def test_every_name_fits_its_column() -> None:
    hop_len = Event.__table__.c.hop.type.length
    event_len = Event.__table__.c.event.type.length
    assert hop_len is not None and event_len is not None
    assert max(len(h) for h in Hop) <= hop_len
    assert max(len(e) for e in EventName) <= event_len


def test_each_outcome_of_the_queue_manager_is_recorded_under_the_event_of_its_name() -> None:
    assert {o: EventName(o) for o in Outcome} == {
        Outcome.DELIVERED: EventName.DELIVERED, Outcome.BOUNCED: EventName.BOUNCED,
        Outcome.EXPIRED: EventName.EXPIRED, Outcome.DEFERRED: EventName.DEFERRED,
    }
    assert set(FINAL) == {EventName(o) for o in Outcome} - {EventName.DEFERRED}
