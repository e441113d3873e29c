"""What the resolvers count reaches /metrics: queries, cache hits, timeouts, latency by type."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import counters
from common.dns import Cache, DNSTempError
from tests.harness.dns import FakeResolver
from web.metrics import Metrics


def test_queries_hits_timeouts_and_latency_are_exported(tmp_path: Path) -> None:
    counters.COUNTERS.clear()
    cache = Cache(FakeResolver({"a.test": {"TXT": ["v=spf1 -all"]}, "slow.test": "TIMEOUT"}))

    async def go() -> None:
        await cache.lookup("a.test", "TXT")
        await cache.lookup("a.test", "TXT")  # a hit
        with pytest.raises(DNSTempError):
            await cache.lookup("slow.test", "TXT")

    asyncio.run(go())
    counters.COUNTERS.save(tmp_path / "metrics" / "mta.json")
    counters.COUNTERS.clear()
    metrics = Metrics(None)
    metrics.daemons.folder = tmp_path / "metrics"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples
    }
    assert samples[("mailroom_dns_queries_total", (("result", "answer"), ("type", "TXT")))] == 1
    assert samples[("mailroom_dns_queries_total", (("result", "timeout"), ("type", "TXT")))] == 1
    assert samples[("mailroom_dns_cache_hits_total", (("how", "cached"), ("type", "TXT")))] == 1
    assert samples[("mailroom_dns_query_seconds_count", (("type", "TXT"),))] == 2
    assert samples[("mailroom_dns_query_seconds_bucket", (("le", "+Inf"), ("type", "TXT")))] == 2
    assert samples[("mailroom_dns_query_seconds_bucket", (("le", "30.0"), ("type", "TXT")))] == 2
