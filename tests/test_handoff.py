"""``labkit.serving.handoff.Handoff``: deltas from an engine thread reach the loop in order, with
one wake-up per burst, and a delta put while the loop drains is never stranded."""

import asyncio
import threading

from labkit.serving.handoff import Handoff, handoff_for


def test_calls_arrive_in_order_with_fewer_wakeups_than_calls():
    async def main():
        loop = asyncio.get_running_loop()
        h = Handoff(loop)
        got: list[int] = []
        done = asyncio.Event()

        def producer():
            for i in range(5000):
                h.put(got.append, i)
            h.put(done.set)

        t = threading.Thread(target=producer)
        t.start()
        await asyncio.wait_for(done.wait(), 10)
        t.join()
        return got, h.wakeups

    got, wakeups = asyncio.run(main())
    assert got == list(range(5000))
    assert 1 <= wakeups < 5000


def test_a_put_during_a_drain_is_delivered():
    async def main():
        loop = asyncio.get_running_loop()
        h = Handoff(loop)
        got: list[str] = []
        done = asyncio.Event()

        def first():  # runs on the loop, inside a drain: a put from here must still arrive
            got.append("first")
            threading.Thread(target=lambda: h.put(second)).start()

        def second():
            got.append("second")
            done.set()

        h.put(first)
        await asyncio.wait_for(done.wait(), 5)
        return got

    assert asyncio.run(main()) == ["first", "second"]


def test_a_failing_callback_does_not_drop_the_rest():
    async def main():
        loop = asyncio.get_running_loop()
        errors: list[dict] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        h = Handoff(loop)
        got: list[int] = []
        h.put(lambda: 1 / 0)
        h.put(got.append, 7)
        await asyncio.sleep(0.05)
        return got, errors

    got, errors = asyncio.run(main())
    assert got == [7] and isinstance(errors[0]["exception"], ZeroDivisionError)


def test_one_handoff_per_loop_and_a_closed_loop_is_harmless():
    loop = asyncio.new_event_loop()
    assert handoff_for(loop) is handoff_for(loop)
    h = handoff_for(loop)
    loop.close()
    h.put(print, "never")  # the loop is gone: nothing to wake, no error
    other = asyncio.new_event_loop()
    assert handoff_for(other) is not h
    other.close()
