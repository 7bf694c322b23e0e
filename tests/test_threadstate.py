"""Each thread's state (_threadstate): its own, made on first use, gone with the thread."""
from __future__ import annotations

import gc
import threading

from bigmachine._threadstate import ThreadState, thread_state


def _in_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    return out[0]


def test_each_thread_has_its_own_state_made_empty_on_first_use():
    mine = thread_state()
    assert isinstance(mine, ThreadState) and thread_state() is mine
    mine.node = "this thread's node"
    try:
        theirs = _in_thread(lambda: (thread_state().node, thread_state().served,
                                     thread_state().loop, thread_state().pending))
        assert theirs == (None, None, None, None)
        assert thread_state().node == "this thread's node"
    finally:
        mine.node = None


def test_a_threads_state_goes_with_the_thread():
    class Held:
        """Something a thread's state holds, whose end is seen."""
        ended = threading.Event()

        def __del__(self):
            Held.ended.set()

    def hold():
        thread_state().node = Held()

    _in_thread(hold)
    gc.collect()
    assert Held.ended.wait(10)
