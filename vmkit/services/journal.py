"""The per-VM journal of multi-step work (store.journal): what each service does with it at daemon start.

A service writes its plan to the VM's journal before the first step and clears it after the last; a crash in
between leaves the entry, and at the next start the service whose op it is finishes or undoes the work
(services/snapshots.py, clones.py, vmsave.py). One entry per VM at most: the VM's lock is held meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from vmkit.errors import NotFound
from vmkit.services.vms import VmRuntime, VmService
from vmkit.store.db import Store

log = logging.getLogger(__name__)


async def recover(
    store: Store, vms: VmService, ops: Collection[str], finish: Callable[[VmRuntime, dict[str, Any]], Awaitable[None]]
) -> None:
    """Call finish(vm, entry) for each journal entry whose op is in ops; an entry of a VM that is gone is
    dropped, and one VM's failure is logged without stopping the others (nor the daemon)."""
    for vm_name, entry in store.journals().items():
        if entry.get("op") not in ops:
            continue
        try:
            vm = vms.runtime(vm_name)
        except NotFound:
            store.set_journal(vm_name, None)
            continue
        log.info("VM %s: finishing an interrupted %s", vm_name, entry.get("op"))
        try:
            await finish(vm, entry)
        except Exception as e:  # noqa: BLE001 - one VM's trouble must not stop the daemon
            log.error("VM %s: cannot finish its interrupted %s: %s", vm_name, entry.get("op"), e)
