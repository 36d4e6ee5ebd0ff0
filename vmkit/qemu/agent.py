"""A minimal client for the QEMU guest agent (qemu-ga) on its virtio-serial chardev socket.

The agent protocol is QMP-like JSON without a greeting. The chardev accepts one client at a time and may
hold stale bytes from an earlier client, so every session starts with guest-sync-delimited: the agent
answers with a 0xFF byte followed by the reply carrying our random id, and everything before it is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmkit.errors import Conflict, Timeout, VmkitError


class AgentError(VmkitError):
    status = 502


@dataclass(frozen=True)
class ExecResult:
    exitcode: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes


class Agent:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, sock: Path, *, timeout_s: float = 5.0) -> Agent:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(sock), limit=64 * 1024 * 1024), timeout_s
            )
        except (TimeoutError, OSError) as e:
            raise AgentError(f"cannot reach the guest agent socket: {e}") from e
        agent = cls(reader, writer)
        try:
            await agent._sync(timeout_s)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _send(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self._writer.write(json.dumps(msg).encode() + b"\n")
        await self._writer.drain()

    async def _sync(self, timeout_s: float) -> None:
        token = random.randint(1, 2**31 - 1)  # noqa: S311 - a session tag, not a secret
        await self._send("guest-sync-delimited", {"id": token})
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                await asyncio.wait_for(self._reader.readuntil(b"\xff"), remaining)
                line = await asyncio.wait_for(self._reader.readline(), max(remaining, 0.1))
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("return") == token:
                        return
        except (TimeoutError, asyncio.IncompleteReadError) as e:
            raise AgentError("the guest agent is not responding (is qemu-ga running in the guest?)") from e

    async def execute(self, cmd: str, args: dict[str, Any] | None = None, *, timeout_s: float = 10.0) -> Any:
        await self._send(cmd, args)
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout_s)
        except TimeoutError as e:
            raise AgentError(f"guest agent did not answer {cmd} within {timeout_s} s") from e
        if not line:
            raise AgentError("guest agent closed the connection")
        reply = json.loads(line)
        if "error" in reply:
            raise AgentError(f"guest agent: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    async def shutdown(self) -> None:
        """Ask the guest to power off (guest-shutdown): no answer comes when it works, the agent just goes."""
        await self._send("guest-shutdown", {"mode": "powerdown"})

    async def exec(self, argv: list[str], *, input_data: bytes | None = None, timeout_s: float = 60.0) -> ExecResult:
        """Run argv in the guest and wait for it, collecting its output."""
        if not argv:
            raise Conflict("no command given")
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input_data is not None:
            args["input-data"] = base64.b64encode(input_data).decode()
        pid = (await self.execute("guest-exec", args))["pid"]
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            status = await self.execute("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return ExecResult(
                    exitcode=status.get("exitcode"),
                    signal=status.get("signal"),
                    stdout=base64.b64decode(status.get("out-data", "")),
                    stderr=base64.b64decode(status.get("err-data", "")),
                )
            if time.monotonic() > deadline:
                raise Timeout(f"command still running in the guest after {timeout_s} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
