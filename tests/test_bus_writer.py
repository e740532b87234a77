"""The frame writer both bus shells run: a lone ACK is held back for data to carry it, and a
frame coming in while it is held does not wake the writer for nothing."""

from __future__ import annotations

import trio
import trio.testing

from bus.writer import WriterWake, write_frames


class Conn:
    """The three BusConn calls write_frames makes, with the answers a test sets."""

    def __init__(self) -> None:
        self.can_wait = True  # an ACK is owed and may wait
        self.frames: list[bytes] = []  # what data_to_send hands out next
        self.checks = 0

    def ack_can_wait(self) -> bool:
        self.checks += 1
        return self.can_wait

    def data_to_send(self) -> bytes | None:
        self.can_wait = False
        return self.frames.pop(0) if self.frames else None


class Ws:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_message(self, message: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(message)


async def test_frames_in_while_an_ack_is_held_do_not_wake_the_writer_until_it_must_send():
    conn, ws, wake = Conn(), Ws(), WriterWake()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: write_frames(ws, conn, wake, ack_delay=60.0,
                                                    on_frame=lambda: None))  # type: ignore[arg-type]
            await trio.testing.wait_all_tasks_blocked()
            assert wake.parked and wake.holding_ack
            checks = conn.checks
            for _ in range(10):  # ten more frames in: the ACK may still wait
                wake.owe_ack(conn)  # type: ignore[arg-type]
                assert wake.parked  # not woken
                await trio.testing.wait_all_tasks_blocked()
            # each owe_ack asked once; the writer itself never ran to ask again
            assert conn.checks == checks + 10 and ws.sent == []
            conn.can_wait = False  # past the hold limit (or data to send): it must go now
            conn.frames.append(b"ack")
            wake.owe_ack(conn)  # type: ignore[arg-type]
            await trio.testing.wait_all_tasks_blocked()
            assert ws.sent == [b"ack"]  # long before the 60 s hold ran out
            assert not wake.holding_ack
            nursery.cancel_scope.cancel()


async def test_an_idle_writer_is_woken_by_the_first_frame_in_to_start_holding_its_ack():
    conn, ws, wake = Conn(), Ws(), WriterWake()
    conn.can_wait = False  # nothing owed yet: the writer parks with nothing to send
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: write_frames(ws, conn, wake, ack_delay=60.0,
                                                    on_frame=lambda: None))  # type: ignore[arg-type]
            await trio.testing.wait_all_tasks_blocked()
            assert wake.parked and not wake.holding_ack
            conn.can_wait = True  # a frame came in: an ACK is owed, and may wait
            wake.owe_ack(conn)  # type: ignore[arg-type]
            await trio.testing.wait_all_tasks_blocked()
            assert wake.parked and wake.holding_ack and ws.sent == []
            nursery.cancel_scope.cancel()
