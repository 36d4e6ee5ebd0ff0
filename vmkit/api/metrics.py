"""Routes for statistics: Prometheus `/metrics` and each VM's recent samples (services/stats.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from vmkit.api.deps import Services, services
from vmkit.api.vms import VmName
from vmkit.model.stats import VmStatsHistory

router = APIRouter(tags=["metrics"])
Svc = Annotated[Services, Depends(services)]


class PrometheusText(PlainTextResponse):
    """The Prometheus text exposition format, version 0.0.4 (Starlette adds `; charset=utf-8`)."""

    media_type = "text/plain; version=0.0.4"


@router.get("/metrics", response_class=PrometheusText)
async def metrics(svc: Svc) -> PrometheusText:
    """Every defined VM in Prometheus text format, with the libvirt exporter's metric names, from the latest
    sampling round (the daemon samples every few seconds; a scrape never waits for QEMU)."""
    return PrometheusText(svc.stats.metrics())


@router.get("/v1/vms/{name}/stats")
async def vm_stats(name: VmName, svc: Svc) -> VmStatsHistory:
    """The VM's samples of the last ten minutes, oldest first (CPU, memory, disks; counters since QEMU started)."""
    return svc.stats.history(name)
