"""The stats board: every replica reports its figures here about twice a second; the ingress reads them all for
`/admin/stats`. A replica that stops reporting (it died) drops off after `STALE_S`."""

from __future__ import annotations

import time

from ray import serve

STALE_S = 5.0


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class MuxBoard:
    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, dict]] = {}  # replica id -> (when, its figures)

    def report(self, replica: str, figures: dict) -> None:
        self.reports[replica] = (time.monotonic(), figures)

    def snapshot(self) -> dict[str, dict]:
        now = time.monotonic()
        self.reports = {r: (t, f) for r, (t, f) in self.reports.items() if now - t <= STALE_S}
        return {r: {**f, "reported_s_ago": round(now - t, 3)} for r, (t, f) in sorted(self.reports.items())}
