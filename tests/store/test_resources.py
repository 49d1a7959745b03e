"""The one owner of per-process state: made once per name, dropped by the one reset, fresh after fork."""

from __future__ import annotations

import os
import sys

import pytest

from worker.runtime import process, resources


class Thing:
    made = 0

    def __init__(self) -> None:
        Thing.made += 1
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_thing_is_made_once_and_reset_closes_it_and_makes_it_afresh() -> None:
    resources.reset(settings=False)
    first = resources.own("test thing", Thing, Thing.close)
    assert resources.own("test thing", Thing, Thing.close) is first
    resources.reset(settings=False)
    assert first.closed
    second = resources.own("test thing", Thing, Thing.close)
    assert second is not first and not second.closed


def test_drop_forgets_only_what_it_names_without_closing_it() -> None:
    kept = resources.own("kept thing", Thing, Thing.close)
    dropped = resources.own("dropped thing", Thing, Thing.close)
    resources.drop("dropped thing")
    assert resources.own("kept thing", Thing) is kept
    assert resources.own("dropped thing", Thing) is not dropped and not dropped.closed


def test_one_that_fails_to_close_does_not_keep_the_others_open() -> None:
    def fail(_: Thing) -> None:
        raise RuntimeError("will not close")

    resources.own("stubborn thing", Thing, fail)
    other = resources.own("other thing", Thing, Thing.close)
    resources.reset(settings=False)
    assert other.closed


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_child_starts_with_nothing_of_its_parents() -> None:
    process.start()
    parent = resources.own("parent thing", Thing)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it holds, then leave without running the parent's cleanup
        held = ",".join(resources.current().names())
        fresh = resources.own("parent thing", Thing) is not parent
        os.write(write, f"{held}|{fresh}".encode())
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1000).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == "|True"
    assert resources.own("parent thing", Thing) is parent  # the parent keeps its own
