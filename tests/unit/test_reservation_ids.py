"""Reservation ids sort by creation time, so new ones land at the right edge of the
indexes keyed on them, and stay unique and unguessable (`ledger.txn.new_reservation_id`)."""

from __future__ import annotations

import re
import time

from budget_server.ledger.txn import new_reservation_id
from budget_server.limits import ID_LENGTH_MAX

ID_SHAPE = re.compile(r"r_[0-9a-f]{13}[0-9a-f]{20}")


def test_ids_sort_by_creation_time_and_never_repeat() -> None:
    ids = []
    for _ in range(50):
        ids.append(new_reservation_id())
        time.sleep(0.0002)  # at least one microsecond apart: the time part must grow
    assert all(ID_SHAPE.fullmatch(i) for i in ids), ids[:3]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert max(len(i) for i in ids) <= min(40, ID_LENGTH_MAX)  # reservations.id is String(40)


def test_ids_made_in_a_burst_differ_in_their_random_part() -> None:
    burst = [new_reservation_id() for _ in range(2_000)]  # several per microsecond
    assert len(set(burst)) == len(burst)
    assert len({i[15:] for i in burst}) == len(burst)
