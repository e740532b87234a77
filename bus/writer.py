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

    __slots__ = ("_lot", "parked", "holding_ack")

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()
        self.parked = False  # True iff the writer waits on this for work
        self.holding_ack = False  # True while it holds a lone ACK back for data to carry it

    def wake(self) -> None:
        if self.parked:
            self.parked = False
            self._lot.unpark_all()

    def owe_ack(self, conn: BusConn) -> None:
        """A frame came in, so an ACK is owed. A writer already holding one back, which may
        go on holding it (`conn.ack_can_wait()`), has nothing new to do: it is not woken. Before
        this, every frame in woke it only to park again (a task switch per frame in the hub
        and in a receiving client)."""
        if not (self.holding_ack and conn.ack_can_wait()):
            self.wake()

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
            wake.holding_ack = True
            try:
                with trio.move_on_after(ack_delay):
                    while conn.ack_can_wait():
                        await wake.wait()
            finally:
                wake.holding_ack = False
        data = conn.data_to_send()
        if data is None:
            await wake.wait()
            continue
        await ws.send_message(data)
        on_frame()
