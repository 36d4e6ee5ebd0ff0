"""The graphical console's routes: the VNC websocket bridge, and the web UI's front-end libraries.

`/v1/vms/{name}/vnc` carries RFB in binary frames, as noVNC speaks it (no websockify, no VNC TCP port: each
client gets a socket pair whose other end QEMU is handed over QMP). `/ui/vendor/` serves the npm packages that
scripts/install-deps.sh installs into vmkit/ui/node_modules (pinned by vmkit/ui/package-lock.json), so no page
fetches anything from a CDN.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, WebSocket
from fastapi.responses import FileResponse

from vmkit.api.deps import ws_services
from vmkit.api.websocket import bridge
from vmkit.errors import NotFound

router = APIRouter(tags=["consoles"])

VENDOR_DIR = Path(__file__).resolve().parent.parent / "ui" / "node_modules"
# What the pages load from the packages; anything else under node_modules is not served.
_VENDOR_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".map": "application/json",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".woff2": "font/woff2",
}
# RFB is a byte stream: noVNC asks for this subprotocol, and a browser fails the connection unless it is echoed.
SUBPROTOCOL = "binary"


@router.websocket("/v1/vms/{name}/vnc")
async def vm_vnc(ws: WebSocket, name: str) -> None:
    """Binary frames both ways between the client and a new (shared) client connection of the VM's VNC server."""
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in ws.scope.get("subprotocols", ()) else None
    await bridge(ws, ws_services(ws).vms.vnc(name), subprotocol=subprotocol)


def vendor_file(rel: str, root: Path = VENDOR_DIR) -> tuple[Path, str]:
    """The file `rel` names under root, and its media type; NotFound for anything outside root (`..`, a symlink
    leading out), hidden, a directory, or of a type the pages do not load."""
    media_type = _VENDOR_TYPES.get(Path(rel).suffix)
    parts = rel.split("/")
    if media_type is None or "\\" in rel or "\0" in rel or any(p.startswith(".") or not p for p in parts):
        raise NotFound(f"no such file: /ui/vendor/{rel}")
    base = root.resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        if not base.is_dir():
            raise NotFound("the web UI's libraries are not installed: run scripts/install-deps.sh")
        raise NotFound(f"no such file: /ui/vendor/{rel}")
    return path, media_type


@router.get("/ui/vendor/{rel:path}", include_in_schema=False)
async def ui_vendor(rel: str) -> FileResponse:
    path, media_type = vendor_file(rel)
    # Pinned by package-lock.json: a file changes only when vmkit is upgraded, so a short cache is safe.
    headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type=media_type, headers=headers)
