"""Dying decode workers: real SIGSEGV and SIGKILL deaths; every item still comes out once, in order, honestly."""

import os
import re
import signal
import time

import pytest
import torch
from torch.utils.data import Dataset, get_worker_info

from pipeline import guard
from pipeline.decode import Sample


class Items(Dataset):
    """Item i is plan index 100 + i, its image filled with that index; some kill their worker."""

    def __init__(self, count, segfault=(), kill_once=None, once_flag=None, fail=(), slow=()):
        self.indices = list(range(100, 100 + count))
        self.segfault, self.kill_once, self.once_flag, self.fail = set(segfault), kill_once, once_flag, set(fail)
        self.slow = set(slow)  # these take a minute in a worker (a hostile file's decode)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        index = self.indices[position]
        if get_worker_info() is not None:
            if index in self.segfault:
                os.kill(os.getpid(), signal.SIGSEGV)
            if index in self.slow:
                time.sleep(60)
            if index == self.kill_once and os.path.exists(self.once_flag):  # an OOM kill of a bystander
                os.unlink(self.once_flag)
                os.kill(os.getpid(), signal.SIGKILL)
        if index in self.fail:
            raise ValueError(f"a bug, not a death: {index}")
        if index % 5 == 4:  # some items are JPEG bytes left to the GPU decoder
            return Sample(index, encoded=bytes([index % 256]) * (1 + index % 3))
        return Sample(index, image=torch.full((3, 2, 2), index % 256, dtype=torch.uint8))


def _run(dataset, batch_size, workers, consumer_seconds=0.0, decode_timeout=None):
    """Every item's index and error in the order they came, and what each ok item carried (pixel or bytes)."""
    indices, errors, images = [], [], {}
    for batch in guard.batches(dataset, batch_size, workers, pin_memory=False, decode_timeout=decode_timeout):
        time.sleep(consumer_seconds)  # the main thread busy elsewhere (the model) when a worker dies
        at = batch.indices.tolist()
        assert sorted(batch.decoded_at + batch.encoded_at) == [i for i, e in enumerate(batch.errors) if e is None]
        images.update({at[i]: int(image[0, 0, 0]) for i, image in zip(batch.decoded_at, batch.images, strict=True)})
        images.update({at[i]: bytes(jpeg.tolist()) for i, jpeg in zip(batch.encoded_at, batch.jpegs(), strict=True)})
        indices += at
        errors += batch.errors
    return indices, errors, images


def _carried(index):
    return bytes([index % 256]) * (1 + index % 3) if index % 5 == 4 else index % 256


def test_without_deaths_batches_are_the_loaders():
    indices, errors, images = _run(Items(10), batch_size=4, workers=2)
    assert indices == list(range(100, 110)) and errors == [None] * 10
    assert images == {i: _carried(i) for i in range(100, 110)}


@pytest.mark.parametrize("consumer_seconds", [0.0, 0.02])
def test_culprits_get_error_rows_and_everything_else_comes_once_in_order(tmp_path, consumer_seconds):
    once = tmp_path / "kill-once"
    once.touch()
    dataset = Items(60, segfault={107, 108, 140}, kill_once=125, once_flag=once)

    indices, errors, images = _run(dataset, batch_size=4, workers=2, consumer_seconds=consumer_seconds)

    assert indices == list(range(100, 160)), "every item exactly once, in order"
    crashed = {i: e for i, e in zip(indices, errors, strict=True) if e is not None}
    assert crashed == {i: "decoder crashed: killed by SIGSEGV" for i in (107, 108, 140)}
    assert images == {i: _carried(i) for i in range(100, 160) if i not in crashed}, "nothing under another's index"
    assert not once.exists(), "the bystander was really killed once, and then decoded alone"


def test_a_crash_on_the_first_and_last_items(tmp_path):
    indices, errors, _ = _run(Items(9, segfault={100, 108}), batch_size=3, workers=2)
    assert indices == list(range(100, 109))
    assert [e is not None for e in errors] == [True] + [False] * 7 + [True]


def test_an_exception_in_a_worker_is_not_taken_for_a_death():
    with pytest.raises(ValueError, match="a bug, not a death: 103"):
        _run(Items(8, fail={103}), batch_size=2, workers=2)


def test_no_workers_decodes_in_process():
    indices, errors, _ = _run(Items(5), batch_size=2, workers=0)
    assert indices == list(range(100, 105)) and errors == [None] * 5


def test_the_sigchld_handler_is_restored_afterwards():
    _run(Items(4), batch_size=2, workers=1)
    before = signal.getsignal(signal.SIGCHLD)
    _run(Items(4, segfault={101}), batch_size=2, workers=1)
    assert signal.getsignal(signal.SIGCHLD) is before


def test_items_over_the_time_limit_get_error_rows_once_each_and_everything_else_comes_in_order(monkeypatch, caplog):
    """Two items that would take a minute each, one of them beside a crash: each costs its worker about the limit
    once (it is not decoded again), and the waits are logged with what the workers are on."""
    monkeypatch.setattr(guard, "SLOW_WAIT_S", 0.5)
    dataset = Items(40, slow={105, 131}, segfault={130})
    started = time.monotonic()

    indices, errors, images = _run(dataset, batch_size=4, workers=2, decode_timeout=1.5)

    seconds = time.monotonic() - started
    assert indices == list(range(100, 140)), "every item exactly once, in order"
    failed = {i: e for i, e in zip(indices, errors, strict=True) if e is not None}
    assert failed == {105: "decode timed out: over 1.5 s", 130: "decoder crashed: killed by SIGSEGV",
                      131: "decode timed out: over 1.5 s"}
    assert images == {i: _carried(i) for i in range(100, 140) if i not in failed}
    assert seconds < 20, f"{seconds:.1f} s: a slow item was waited for more than once, or to its end"
    assert re.search(r"item 105 was still decoding after \d+ s, over the decode time limit of 1.5 s", caplog.text)
    assert re.search(r"waited \d+ s for the next decoded batch; the workers are decoding: item 105 for", caplog.text)


def test_without_a_limit_a_slow_item_is_waited_for(monkeypatch):
    monkeypatch.setattr(Items, "__getitem__", _slow_getitem)
    indices, errors, _ = _run(Items(6), batch_size=2, workers=2)
    assert indices == list(range(100, 106)) and errors == [None] * 6


def _slow_getitem(self, position):
    time.sleep(1.2 if position == 3 else 0)  # over POLL_S: the wait polls and goes on
    return Sample(self.indices[position], image=torch.zeros((3, 2, 2), dtype=torch.uint8))
