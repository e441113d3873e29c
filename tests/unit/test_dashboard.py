"""deploy/grafana-dashboard.json asks only for series that /metrics exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from common import counters
from common.db import Database
from common.log import new_trace_id
from common.models import utcnow
from web.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"


def test_every_dashboard_query_names_an_exported_series(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'mailroom.db'}", threads=1)
    db.create_schema()
    metrics = Metrics(db)
    trace, now = new_trace_id(), utcnow()
    metrics.observe([
        {"trace": trace, "hop": "msa", "event": "received", "when": now, "detail": "tls=yes"},
        {"trace": trace, "hop": "qmgr", "event": "delivered", "when": now, "detail": ""},
    ])
    # What the daemons count in memory, as they save it.
    saved = counters.Counters()
    saved.inc(counters.LOGIN_FAILURES, listener="127.0.0.1:2587")
    saved.inc(counters.CONNECTIONS, listener="127.0.0.1:2525", result="accepted")
    saved.inc(counters.CONNECTIONS, listener="127.0.0.1:2525", result="refused")
    saved.inc(counters.TLS_OUT, hop="qmgr", tls="yes")
    saved.inc("dns_queries", type="TXT", result="timeout")
    saved.inc("dns_cache_hits", type="TXT", how="cached")
    saved.inc("dns_query_seconds_bucket", type="TXT", le="0.005")
    saved.inc("dns_query_seconds_sum", type="TXT")
    saved.save(tmp_path / "metrics" / "mta.json")
    metrics.daemons.folder = tmp_path / "metrics"
    exported = {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    wanted = {name for e in exprs for name in re.findall(r"\bmailroom_[a-z_]+", e)}
    assert wanted and wanted <= exported, wanted - exported
    # Every panel has a place on the grid and a unique id.
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids) and all({"x", "y", "w", "h"} <= p["gridPos"].keys() for p in dashboard["panels"])
