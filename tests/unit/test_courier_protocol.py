"""Both couriers implement the one interface of mta/courier.py, with the same signatures.

mypy checks this too (the queue manager takes two `Courier`s); this test says it
where a reader of the tests looks, and holds without mypy.  Delivering through
both to real listeners is tests/component/test_courier.py.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from mta.courier import Courier
from mta.delivery import LocalDelivery, RemoteDelivery

COURIERS = [LocalDelivery, RemoteDelivery]


def _signature(f: Any) -> tuple[list[tuple[str, Any]], Any]:
    sig = inspect.signature(f)
    return [(p.name, p.annotation) for p in sig.parameters.values()], sig.return_annotation


@pytest.mark.parametrize("cls", COURIERS, ids=lambda c: c.__name__)
def test_the_courier_has_the_protocols_methods_with_its_signatures(cls: type) -> None:
    for name in ("deliver", "close"):
        method = getattr(cls, name)
        assert inspect.iscoroutinefunction(method), name
        assert _signature(method) == _signature(getattr(Courier, name)), name


def test_only_the_courier_to_our_mda_is_local() -> None:
    assert isinstance(Courier.local, property)
    assert [cls.local for cls in COURIERS] == [True, False]
