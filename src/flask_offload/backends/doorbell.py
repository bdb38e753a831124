"""Wake-ups between processes on one machine: a doorbell of Unix datagram sockets beside the
SQLite file.

A process whose pool waits for work binds a socket in ``<database>-wake/``; a process that
stores a job rings every socket there after the commit (one datagram each, a few
microseconds, carrying when the job is due), so an idle ``flask offload worker`` starts a job
another process enqueued within milliseconds instead of a poll interval later. Waiting costs
nothing: the listener thread blocks in ``recv``. A burst of rings waits for room in a slow
listener's queue rather than lose a due time (see ``SEND_WAIT``). A socket left by a killed
process refuses the datagram and is removed by whoever rings it. Polling stays the safety
net, and is all there is where Unix datagram sockets are not (Windows).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("flask_offload")

MAX_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
RECHECK = 0.5  # seconds between looks at the folder for processes that listen
# A listener's queue holds few datagrams (10 on Linux by default), and each carries its own
# due time: a ring waits up to SEND_WAIT seconds for room rather than lose one, except to a
# process that let it wait that long in vain (stopped, or stuck), for STUCK_FOR seconds.
SEND_WAIT = 0.1
STUCK_FOR = 5.0


class Doorbell:
    """Ring the other processes that use the same SQLite file, or listen for them."""

    def __init__(self, database: str) -> None:
        self.folder = f"{database}-wake"
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._name: str | None = None
        self._wakes: list[Callable[[float | None], None]] = []
        self._peers: list[str] = []
        self._seen: int | None = None  # the folder's mtime when _peers was read
        self._fresh_until = 0.0  # _peers is used as it is until then
        self._folder_fd: int | None = None
        self._pid = os.getpid()
        self._failures: set[tuple[type[OSError], int | None]] = set()  # causes logged once
        self._stuck: dict[str, float] = {}  # socket -> until when rings do not wait for it

    @staticmethod
    def available() -> bool:
        return hasattr(socket, "AF_UNIX")

    # -- ringing ---------------------------------------------------------------------------------

    def ring(self, at: float | None = None) -> None:
        """Tell every listening process that a job is due (now, or at ``at``). Best effort,
        it never raises: it runs after the job is committed, and an error here would make
        the caller store the job again. What fails is logged once per cause; the other
        processes find the job by polling."""
        if not self.available():
            return
        try:
            peers = self._current_peers()
            if not peers:
                return
            message = b"now" if at is None else repr(at).encode()
            sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            with contextlib.suppress(OSError):  # the kernel's own wait for room, bounded
                wait = struct.pack("ll", 0, int(SEND_WAIT * 1_000_000))
                sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wait)
            try:
                for name in peers:
                    self._send(sender, name, message)
            finally:
                sender.close()
        except OSError as error:
            cause = (type(error), error.errno)
            if cause not in self._failures:
                self._failures.add(cause)
                logger.warning(
                    "cannot ring the other processes' wake-up sockets in %s (%s): they find "
                    "new jobs by polling (OFFLOAD_POLL_INTERVAL). Run every process that uses "
                    "this job store as one user, or let this one read that folder",
                    self.folder,
                    error,
                )

    def _current_peers(self) -> list[str]:
        """The sockets in the folder, but this process's own. The folder is looked at no more
        than every ``RECHECK`` seconds (a stat costs more than the rest of a ring): a process
        that starts listening meanwhile is found by its own first claim or by polling."""
        now = time.monotonic()
        if now < self._fresh_until:
            return self._peers
        self._fresh_until = now + RECHECK
        try:
            stamp = os.stat(self.folder).st_mtime_ns
        except OSError:  # no folder: nobody listens
            self._peers, self._seen = [], None
            return self._peers
        if stamp != self._seen:
            own = self._name
            self._peers = [
                name for name in os.listdir(self.folder) if name.endswith(".sock") and name != own
            ]
            self._seen = stamp
        return self._peers

    def _send(self, sender: socket.socket, name: str, message: bytes) -> None:
        stuck = self._stuck.get(name, 0.0) > time.monotonic()
        try:
            sender.sendto(message, socket.MSG_DONTWAIT if stuck else 0, self._address(name))
        except (ConnectionRefusedError, FileNotFoundError):
            self._peers = [peer for peer in self._peers if peer != name]
            with contextlib.suppress(OSError):  # its process is gone
                os.unlink(os.path.join(self.folder, name))
        except OSError:  # still full: that process reads nothing; it finds the job by polling
            if not stuck:
                self._stuck[name] = time.monotonic() + STUCK_FOR
        else:
            self._stuck.pop(name, None)  # it reads again

    def _address(self, name: str) -> str:
        """A path ``sun_path`` can hold: the real one, or one through /proc/self/fd."""
        path = os.path.join(self.folder, name)
        if len(path.encode()) <= MAX_PATH:
            return path
        if self._folder_fd is None or self._pid != os.getpid():
            self._folder_fd, self._pid = os.open(self.folder, os.O_RDONLY), os.getpid()
        return f"/proc/self/fd/{self._folder_fd}/{name}"

    # -- listening -------------------------------------------------------------------------------

    def listen(self, wake: Callable[[float | None], None]) -> None:
        """Call ``wake(at)`` whenever another process rings; the first call binds a socket."""
        if not self.available():
            return
        with self._lock:
            self._wakes.append(wake)
            if self._socket is not None:
                return
            try:
                os.makedirs(self.folder, exist_ok=True)
                name = f"{os.getpid()}-{secrets.token_hex(4)}.sock"
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                listener.bind(self._address(name))
            except OSError as error:
                logger.info("no wake-ups between processes (%s): polling instead", error)
                return
            self._socket, self._name = listener, name
            self._seen, self._fresh_until = None, 0.0
        threading.Thread(
            target=self._receive, args=(listener,), name="offload-doorbell", daemon=True
        ).start()
        # A process that rang just now may not have seen this socket yet (it looks at the
        # folder every RECHECK seconds): one more look at the queue once they all have.
        wake(time.time() + RECHECK + 0.05)

    def _receive(self, listener: socket.socket) -> None:
        while True:
            try:
                message = listener.recv(64)
            except OSError:
                return
            if not message or listener is not self._socket:
                return  # hung up
            try:
                at = None if message == b"now" else float(message)
            except ValueError:
                at = None
            for wake in list(self._wakes):
                wake(at)

    def stop_listening(self, wake: Callable[[float | None], None]) -> None:
        """Stop calling ``wake``; with no one left to wake, leave the folder."""
        with self._lock:
            if wake in self._wakes:
                self._wakes.remove(wake)
            if not self._wakes:
                self._hang_up()

    def _hang_up(self) -> None:
        listener, name = self._socket, self._name
        self._socket = self._name = None
        if listener is None or name is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.folder, name))
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()

    def close(self) -> None:
        with self._lock:
            self._wakes.clear()
            self._hang_up()
        if self._folder_fd is not None and self._pid == os.getpid():
            os.close(self._folder_fd)
            self._folder_fd = None

    def after_fork(self) -> None:
        """In a forked child: the parent's socket and listener are not ours (never unlink
        the parent's file); start afresh."""
        self._socket = self._name = self._folder_fd = None
        self._wakes, self._peers, self._seen, self._fresh_until = [], [], None, 0.0
        self._lock = threading.Lock()
