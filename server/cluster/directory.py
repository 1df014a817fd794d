"""Per-replica metrics behind one endpoint: every replica reports its server's /metrics to the directory (a one-replica
deployment) each second, and the proxy's /metrics answers with all of them, each sample labelled with its
`replica`. A replica that stopped reporting (gone, or replaced) drops out after `STALE_SECONDS`.

A scrape is at most a report's interval old; Prometheus' own per-pod scraping (Kubernetes, `deploy/`) needs none of
this.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

STALE_SECONDS = 5.0
"""A replica whose last report is older than this is left out (it is gone, or it cannot reach the directory)."""


class Directory:
    """The replicas' latest metrics, by replica id."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, str]] = {}

    def report(self, replica: str, text: str) -> None:
        self.reports[replica] = (time.monotonic(), text)

    def snapshot(self) -> dict[str, str]:
        """The latest report of each replica that reported within STALE_SECONDS."""
        now = time.monotonic()
        self.reports = {r: (t, text) for r, (t, text) in self.reports.items() if now - t <= STALE_SECONDS}
        return {r: text for r, (_, text) in self.reports.items()}


class _Merged:
    """A prometheus_client collector of already-built metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge(reports: dict[str, str]) -> bytes:
    """One Prometheus text of every replica's metrics, each sample labelled `replica="<id>"`, families kept whole
    (one HELP and TYPE each)."""
    families: dict[str, Metric] = {}
    for replica in sorted(reports):
        for family in text_string_to_metric_families(reports[replica]):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(
                Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)
