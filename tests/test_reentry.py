"""_reentry: the events lock and outbound calls a signal handler can enter without deadlock."""

from __future__ import annotations

import contextlib
import signal
import threading

import pytest

from kernel_fallback._reentry import Bookkeeping, Outbound


def test_the_interrupted_thread_defers_and_the_work_runs_when_it_leaves() -> None:
    book = Bookkeeping()
    done: list[str] = []
    assert book.enter()
    # What a signal handler on this thread meets: the state is mid-change.
    assert not book.enter()
    book.defer(lambda: done.append("deferred"))
    done.append("outer")
    book.leave()
    assert done == ["outer", "deferred"]
    assert book.enter(), "left free for the next caller"
    book.leave()


def test_another_thread_waits_for_the_lock_instead_of_deferring() -> None:
    book = Bookkeeping()
    entered = threading.Event()
    results: list[bool] = []
    assert book.enter()

    def other_thread() -> None:
        results.append(book.enter())
        entered.set()
        book.leave()

    worker = threading.Thread(target=other_thread)
    worker.start()
    assert not entered.wait(0.2), "another thread got in while the state was mid-change"
    book.leave()
    worker.join(timeout=30)
    assert results == [True]


def test_deferred_work_runs_also_when_an_exception_unwinds_the_section() -> None:
    book = Bookkeeping()
    done: list[str] = []

    def section() -> None:
        assert book.enter()
        try:
            book.defer(lambda: done.append("flushed"))
            raise SystemExit(0)  # what a SIGTERM handler raises after flush()
        finally:
            book.leave()

    with pytest.raises(SystemExit):
        section()
    assert done == ["flushed"]


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
def test_outbound_work_a_signal_handler_starts_waits_for_the_interrupted_call() -> None:
    outbound = Outbound()
    order: list[str] = []

    def on_alarm(signum: int, frame: object) -> None:
        outbound.run(lambda: order.append("handler"))

    def interrupted() -> None:
        order.append("start")
        signal.raise_signal(signal.SIGALRM)  # the handler runs here, inside this call
        order.append("end")

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        outbound.run(interrupted)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert order == ["start", "end", "handler"]
    outbound.run(lambda: order.append("later"))
    assert order[-1] == "later", "not left active"


def test_a_call_that_must_answer_now_is_refused_mid_change() -> None:
    book = Bookkeeping()
    assert book.enter()
    try:
        with pytest.raises(RuntimeError, match=r"stats\(\) was called from a signal handler"):
            contextlib.ExitStack().enter_context(book.entered("stats()"))
    finally:
        book.leave()
    with book.entered("stats()"):  # free again: entered
        assert not book.enter(), "held inside the block"
    assert book.enter(), "left after the block"
    book.leave()
