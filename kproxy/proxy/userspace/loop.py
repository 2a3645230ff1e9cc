"""One epoll loop in one background thread of the agent process: it serves every listener,
connection and UDP association of the node, and runs their timers.

Other threads hand it work with ``call`` (sync, cleanup, the listener table), so the
loop's objects are only ever touched from its own thread.
"""

from __future__ import annotations

import fcntl
import heapq
import itertools
import os
import select
import sys
import threading
import time
from typing import Any, Callable

R, W = select.EPOLLIN, select.EPOLLOUT
RDHUP = select.EPOLLRDHUP  # the peer sent FIN: read on to the end in this round
ERRORS = select.EPOLLERR | select.EPOLLHUP  # always reported: handlers treat them as readable and writable
PIPE_SIZE = 1 << 20  # splice pipe capacity (fs/pipe-max-size allows 1 MiB)
PIPE_POOL = 64  # idle splice pipes kept for the next connections
COPY_BUFFER = 256 * 1024  # the shared buffer of the recv/send copier

Handler = Callable[[int], None]  # called with the epoll event mask of its fd


class ProxyLoop:
    """One epoll loop in one thread: listeners, TCP connections, UDP associations, timers."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.pipes: list[tuple[int, int]] = []  # idle, empty splice pipes
        self.handlers: dict[int, Handler] = {}
        self.masks: dict[int, int] = {}
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._calls: list[tuple[Callable[[], Any], dict[str, Any], threading.Event]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.set_interest(self._wake_r, R, self._drain)
        self.buffer = bytearray(COPY_BUFFER)
        self.view = memoryview(self.buffer)
        self.running = True
        self.thread = threading.Thread(target=self._run, name="kproxy-userspace", daemon=True)
        self.thread.start()

    # plumbing ----------------------------------------------------------------

    def set_interest(self, fd: int, mask: int, handler: Handler | None = None) -> None:
        if handler is not None:
            self.handlers[fd] = handler
        old = self.masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            self.epoll.unregister(fd)
            del self.masks[fd]
        elif not old:
            self.epoll.register(fd, mask)
            self.masks[fd] = mask
        else:
            self.epoll.modify(fd, mask)
            self.masks[fd] = mask

    def forget(self, fd: int, closing: bool = True) -> None:
        """Stop watching fd; closing: the caller closes it next, which takes it out of epoll by itself."""
        if self.masks.pop(fd, 0) and not closing:
            self.epoll.unregister(fd)
        self.handlers.pop(fd, None)

    def pipe(self) -> tuple[int, int]:
        """An empty pipe for splice (from the pool, or new with PIPE_SIZE capacity)."""
        if self.pipes:
            return self.pipes.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        return r, w

    def release_pipe(self, r: int, w: int, empty: bool) -> None:
        if empty and len(self.pipes) < PIPE_POOL:
            self.pipes.append((r, w))
        else:
            os.close(r)
            os.close(w)

    def at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when, next(self._seq), callback))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn in the loop thread and return its result (or raise its exception)."""
        if threading.current_thread() is self.thread or not self.thread.is_alive():
            return fn()
        done = threading.Event()
        box: dict[str, Any] = {}
        with self._lock:
            self._calls.append((fn, box, done))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _drain(self, mask: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, box, done in calls:
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            done.set()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.call(lambda: setattr(self, "running", False))
            self.thread.join(5)

    def _run(self) -> None:
        while self.running:
            timeout = -1.0
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            try:
                events = self.epoll.poll(timeout)
            except InterruptedError:
                continue
            self._dispatch(events)
            self._fire_timers()

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        handlers = self.handlers
        masks = self.masks
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is not None and fd in masks:
                if mask & ERRORS:
                    mask |= R | W | RDHUP
                try:
                    handler(mask)
                except Exception as exc:  # one connection's trouble never stops the loop
                    print(f"kproxy userspace: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, callback = heapq.heappop(self.timers)
            try:
                callback()
            except Exception as exc:
                print(f"kproxy userspace: timer: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
