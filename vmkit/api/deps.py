"""The services a route may call, reached through the app state (set once at daemon start)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request, WebSocket

from vmkit.qemu.argv import HostConfig
from vmkit.services.events import EventBus
from vmkit.services.images import ImageService
from vmkit.services.operations import Operations
from vmkit.services.vms import VmService


@dataclass
class Services:
    vms: VmService
    images: ImageService
    ops: Operations
    bus: EventBus
    host: HostConfig
    host_report: dict[str, object]


def services(request: Request) -> Services:
    return request.app.state.services


def ws_services(ws: WebSocket) -> Services:
    return ws.app.state.services
