"""ComfyUI's websocket, `/ws?clientId=`: the messages of the prompts queued with that client_id
(`status`, `execution_start`, `execution_cached`, `executing`, `progress`, `executed`, ...) as
JSON text frames, and binary preview frames (4-byte big-endian event type 1, 4-byte image format
1 JPEG / 2 PNG, then the image) when the prompt asked for previews.

Messages come from the workflow driver of this API process (genserve/workflows/runner.py).
With auth on, the socket needs the API key as any GET does (header or the web UI's cookie).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect

from genserve.auth.deps import get_principal

router = APIRouter(include_in_schema=False)
_QUEUE_SIZE = 1000  # messages waiting for a slow client before the oldest are dropped


class Hub:
    """Websocket clients by client id. Called from the event loop's thread and from driver
    threads (`send` hands over to the loop)."""

    def __init__(self) -> None:
        self.clients: dict[str, set[asyncio.Queue]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue_remaining = lambda: 0

    def attach(self, client_id: str) -> asyncio.Queue:
        self.loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(_QUEUE_SIZE)
        self.clients.setdefault(client_id, set()).add(queue)
        return queue

    def detach(self, client_id: str, queue: asyncio.Queue) -> None:
        queues = self.clients.get(client_id, set())
        queues.discard(queue)
        if not queues:
            self.clients.pop(client_id, None)

    def send(self, client_id: str | None, kind: str, data: dict[str, Any]) -> None:
        self._put(client_id, json.dumps({"type": kind, "data": data}))

    def send_binary(self, client_id: str | None, frame: bytes) -> None:
        self._put(client_id, frame)

    def broadcast_status(self) -> None:
        for client_id in list(self.clients):
            self._put(client_id, json.dumps(self.status()))

    def status(self, sid: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}
        if sid is not None:
            data["sid"] = sid
        return {"type": "status", "data": data}

    def _put(self, client_id: str | None, message: str | bytes) -> None:
        if client_id is None or client_id not in self.clients or self.loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._deliver(client_id, message)
        else:
            self.loop.call_soon_threadsafe(self._deliver, client_id, message)

    def _deliver(self, client_id: str, message: str | bytes) -> None:
        for queue in self.clients.get(client_id, ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(message)


def hub_of(app: Any) -> Hub:
    if not hasattr(app.state, "comfy_hub"):
        app.state.comfy_hub = Hub()
    return app.state.comfy_hub


@router.websocket("/ws")
async def comfy_socket(websocket: WebSocket) -> None:
    try:
        get_principal(websocket)  # type: ignore[arg-type]  # reads headers, cookies and app state only
    except HTTPException as error:
        await websocket.close(code=1008, reason=str(error.detail)[:120])
        return
    client_id = websocket.query_params.get("clientId") or uuid.uuid4().hex
    await websocket.accept()
    hub = hub_of(websocket.app)
    queue = hub.attach(client_id)
    receiver = asyncio.create_task(_drain(websocket))
    try:
        await websocket.send_text(json.dumps(hub.status(client_id)))
        while not receiver.done():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            message = getter.result()
            if isinstance(message, bytes):
                await websocket.send_bytes(message)
            else:
                await websocket.send_text(message)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        hub.detach(client_id, queue)
        receiver.cancel()
        with contextlib.suppress(Exception):
            await websocket.close()


async def _drain(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, to notice when it goes away."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            await websocket.receive_text()
