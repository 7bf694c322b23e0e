"""Each thread's state (_threadstate): its own, made on first use, gone with the thread."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from bigmachine._node import current_node
from bigmachine._threadstate import ThreadState, swap_node, thread_state


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh thread (its per-thread dict not made yet), with allocation failing:
# PyThreadState_GetDict() returns NULL. thread_state() must raise MemoryError
# (as the threading.local it replaced does), not dereference NULL.
_CHILD = textwrap.dedent("""
    import sys, threading, _testcapi
    from bigmachine._threadstate import thread_state

    seen = []

    def run():
        keep = [{} for _ in range(300)]  # empty the dict free list: a new dict needs malloc
        _testcapi.set_nomemory(0, 0)
        try:
            thread_state()
        except MemoryError:
            _testcapi.remove_mem_hooks()
            seen.append("MemoryError")
        else:
            _testcapi.remove_mem_hooks()
            seen.append("made")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    print(seen, flush=True)
    sys.exit(0 if seen else 3)
""")


def test_thread_state_without_a_thread_dict_raises_instead_of_crashing():
    pytest.importorskip("_testcapi")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, (
        f"the process died (returncode {child.returncode}): thread_state() dereferenced "
        f"the NULL PyThreadState_GetDict() returns when the dict cannot be made\n{child.stderr[-2000:]}")
    assert child.stdout.strip() in ("['MemoryError']", "['made']")


def test_swap_node_makes_a_node_current_on_this_thread_only_and_returns_the_one_before():
    before = thread_state().node
    try:
        assert swap_node("a node") is before
        assert current_node() == "a node"
        assert _in_thread(lambda: thread_state().node) is None
        assert swap_node(before) == "a node"
    finally:
        thread_state().node = before
