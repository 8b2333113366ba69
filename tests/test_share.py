"""The share of plain JPEGs that Pillow decodes in the workers on the GPU path: routed by plan index, read by forked
workers from shared memory, and adapted from fed waits (no timing)."""

import multiprocessing

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.models import ResNet18_Weights

from pipeline import share as share_module
from pipeline.decode import ImageFiles, Preprocess, decode_bytes
from pipeline.plan import new_plan
from pipeline.share import MAX_CPU_SHARE, START, STEP, WINDOW, DecoderShare
from pipeline.source import LocalFolder
from tests.conftest import write_image

PREPROCESS = Preprocess.from_transforms(ResNet18_Weights.IMAGENET1K_V1.transforms())


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.1, 0.37, 0.5, 1.0])
def test_routing_is_deterministic_and_takes_the_share_of_every_batch(fraction):
    share = DecoderShare(fraction)
    for first in (0, 10**9):  # late indices of a big plan too
        routed = [share.to_pillow(index) for index in range(first, first + 10_240)]
        assert routed == [share.to_pillow(index) for index in range(first, first + 10_240)]
        assert abs(sum(routed) / len(routed) - fraction) <= 0.02
        for start in range(0, len(routed), 256):  # each batch of 256, not just the whole
            assert abs(sum(routed[start:start + 256]) / 256 - fraction) <= 0.02


def _folder(tmp_path):
    for i in range(6):
        write_image(tmp_path / f"{i}.jpg", i, size=(120, 90))
    write_image(tmp_path / "6.png", 6, size=(50, 70))
    return LocalFolder(tmp_path), new_plan(LocalFolder(tmp_path).list(), 10, {})


def _samples(source, plan, share):
    dataset = ImageFiles(source, plan, list(range(len(plan.paths))), PREPROCESS, gpu_jpeg=True, share=share)
    return [dataset[i] for i in range(len(dataset))]


def test_a_share_of_0_hands_every_plain_jpeg_over_and_1_decodes_them_in_the_worker_as_pillow_does(tmp_path):
    source, plan = _folder(tmp_path)
    today, none, every = _samples(source, plan, None), _samples(source, plan, DecoderShare(0.0)), _samples(
        source, plan, DecoderShare(1.0))

    for before, after in zip(today, none, strict=True):
        assert (after.index, after.encoded, after.encoded_shape, after.error) == (
            before.index, before.encoded, before.encoded_shape, before.error)
        assert (after.image is None) == (before.image is None)
    assert [s.encoded is not None for s in none] == [True] * 6 + [False], "the PNG is Pillow's either way"
    for sample, path in zip(every, plan.paths.to_pylist(), strict=True):
        assert sample.encoded is None and sample.error is None
        assert torch.equal(sample.image, decode_bytes((tmp_path / path).read_bytes(), PREPROCESS))


def test_a_share_between_routes_the_items_it_names(tmp_path):
    source, plan = _folder(tmp_path)
    share = DecoderShare(0.5)
    samples = _samples(source, plan, share)
    assert [s.image is not None for s in samples[:6]] == [share.to_pillow(i) for i in range(6)]
    assert 0 < sum(s.image is not None for s in samples[:6]) < 6


def _fed(share, batches, loader_per_batch, decode_per_batch, seconds_per_batch=0.1, first_loader_wait=0.0):
    """Feed the controller `batches` batches of the given waits (cumulative seconds, as the runner passes them)."""
    for batch in range(batches):
        share.after_batch(first_loader_wait + loader_per_batch * batch, decode_per_batch * batch,
                          now=seconds_per_batch * batch)


def test_the_share_goes_down_when_the_workers_are_waited_for():
    share = DecoderShare()
    _fed(share, 1 + WINDOW, loader_per_batch=0.01, decode_per_batch=0.05)  # 10 % on the workers, 50 % on the GPU
    assert share.value == pytest.approx(START - STEP)


def test_the_share_goes_up_when_the_model_waits_for_the_gpu_decoder():
    share = DecoderShare()
    _fed(share, 1 + WINDOW, loader_per_batch=0.0, decode_per_batch=0.05)
    assert share.value == pytest.approx(START + STEP)


def test_the_share_holds_when_neither_is_waited_for_and_between_decisions():
    share = DecoderShare()
    _fed(share, 1 + 3 * WINDOW, loader_per_batch=0.001, decode_per_batch=0.001)  # 1 %: the model bounds the run
    assert share.value == START
    moving = DecoderShare()
    _fed(moving, WINDOW, loader_per_batch=0.0, decode_per_batch=0.05)
    assert moving.value == START, "no decision before a whole window"


def test_the_wait_for_the_workers_to_start_is_not_held_against_them():
    share = DecoderShare()
    _fed(share, 1 + WINDOW, loader_per_batch=0.0, decode_per_batch=0.05, first_loader_wait=5.0)
    assert share.value == pytest.approx(START + STEP)


def test_the_share_stays_within_its_bounds_and_a_fixed_share_never_moves():
    rising, falling, fixed = DecoderShare(), DecoderShare(), DecoderShare(0.25)
    for share in (rising, fixed):
        _fed(share, 1 + 100 * WINDOW, loader_per_batch=0.0, decode_per_batch=0.05)
    _fed(falling, 1 + 100 * WINDOW, loader_per_batch=0.05, decode_per_batch=0.0)
    assert rising.value == MAX_CPU_SHARE and falling.value == 0.0
    assert fixed.value == fixed.mean == 0.25
    assert START < rising.mean < MAX_CPU_SHARE
    assert "0.500 at the end" in rising.describe() and "(adapted)" in rising.describe()


def test_a_change_logs_at_debug_level(caplog):
    share = DecoderShare()
    with caplog.at_level("DEBUG", logger=share_module.__name__):
        _fed(share, 1 + WINDOW, loader_per_batch=0.0, decode_per_batch=0.05)
    assert "cpu decode share 0.10 -> 0.12" in caplog.text


class _SeenShare(Dataset):
    """Each item: the share as the worker reads it; items from 2 on wait until the parent says go."""

    def __init__(self, share: DecoderShare, go):
        self.share, self.go = share, go

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> float:
        if index >= 2:
            assert self.go.wait(30)
        return self.share.value


def test_forked_workers_read_the_share_the_main_process_sets_while_they_run():
    share, go = DecoderShare(), multiprocessing.get_context("fork").Event()
    loader = DataLoader(_SeenShare(share, go), batch_size=1, num_workers=2, prefetch_factor=1,
                        multiprocessing_context="fork")
    batches = iter(loader)  # the workers fork here
    seen = [next(batches).item(), next(batches).item()]
    _fed(share, 1 + WINDOW, loader_per_batch=0.0, decode_per_batch=0.05)  # the controller raises it
    go.set()
    seen += [batch.item() for batch in batches]
    assert seen == pytest.approx([START, START, START + STEP, START + STEP])
