"""Owns the frame writer both trio shells run for a bus connection (hub.py per link, client.py
per dial): whatever BusConn has queued goes out as one frame at once; a lone ACK waits,
bounded by ack_delay, for data to the same peer to carry it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from bus.conn import BusConn


class _FrameSink(Protocol):
    async def send_message(self, message: bytes) -> None: ...


class WriterWake:
    """Parks a writer with nothing to send; waking a writer that is not parked costs nothing."""

    __slots__ = ("_lot", "parked")

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()
        self.parked = False  # True iff the writer waits on this for work

    def wake(self) -> None:
        if self.parked:
            self.parked = False
            self._lot.unpark_all()

    async def wait(self) -> None:
        self.parked = True
        try:
            await self._lot.park()
        finally:
            self.parked = False


async def write_frames(ws: _FrameSink, conn: BusConn, wake: WriterWake, *, ack_delay: float,
                       on_frame: Callable[[], None],
                       stop: Callable[[], bool] = lambda: False) -> None:
    """Send `conn`'s frames on `ws` until `stop()` or cancellation; `on_frame` counts each."""
    while not stop():
        if ack_delay > 0 and conn.ack_can_wait():
            with trio.move_on_after(ack_delay):
                while conn.ack_can_wait():
                    await wake.wait()
        data = conn.data_to_send()
        if data is None:
            await wake.wait()
            continue
        await ws.send_message(data)
        on_frame()
