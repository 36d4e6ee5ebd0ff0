"""Pure data types for saved VM states (virsh save / restore / managedsave): see services/vmsave.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from vmkit.model.storage import VolumeKey


class SaveVm(BaseModel):
    """Body of POST /v1/vms/{name}/save."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    # The new save volume; default: default/<VM>.save (or <VM>-N.save when that is taken).
    volume: VolumeKey | None = None


class SaveInfo(BaseModel):
    """A save volume, as its header describes it."""

    volume: str  # POOL/NAME
    vm: str  # the VM it belongs to, by name…
    uuid: str  # …and UUID (a VM deleted and made again under the same name is another VM)
    state: Literal["running", "paused"]  # what the VM was doing; a restore brings that back
    managed: bool  # the VM's managed save (vm stop --save): its next start resumes from it, then deletes it
    saved_at: float  # seconds since the epoch
    size_bytes: int
