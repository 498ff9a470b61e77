"""The training order from the outside: a fresh global permutation every epoch, the same global batches on any
number of ranks, and a start at any (epoch, step) that reads nothing before it."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import scipy.stats

from pipeline import order as order_module
from pipeline import Output, Reading, train_loader
from tests import shardkit

ONE_THREAD, TWO_THREADS = Reading(num_threads=1), Reading(num_threads=2)
WITH_INDEX = Output(with_index=True)
FLAT = np.full((256, 256, 3), 100, np.uint8)  # decodes in microseconds: these tests are about order, not pixels


def flat_data(root, count: int, shard_size: int):
    """`count` training samples, sample i of class i % 10, without computing statistics from 10,000 images."""
    items = [(FLAT, i % 10) for i in range(count)]
    return shardkit.write_data(root, {"train": items}, shard_size=shard_size, mean_image=np.zeros((256, 256, 3)),
                               eigval=np.ones(3), eigvec=np.eye(3))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return flat_data(tmp_path_factory.mktemp("small"), 50, shard_size=16)


def epochs_of(loader, epochs: int) -> list[list[list[int]]]:
    """Per epoch, per step, the sample positions this loader yielded."""
    return [[index.tolist() for _, _, index in loader] for _ in range(epochs)]


@pytest.mark.slow
def test_consecutive_epochs_are_independent_permutations(tmp_path):
    count, batch = 10_000, 100
    data = flat_data(tmp_path, count, shard_size=2_500)
    first, second = epochs_of(train_loader(data, batch, lighting=0, output=WITH_INDEX, reading=TWO_THREADS), 2)
    rank_in = []
    for epoch in (first, second):
        flat = [i for step in epoch for i in step]
        assert len(flat) == len(set(flat)) == count  # 10,000 // 100 steps: every sample exactly once
        rank_in.append(np.argsort(flat))  # sample -> its place in the epoch
    rho = scipy.stats.spearmanr(rank_in[0], rank_in[1]).statistic
    assert abs(rho) < 0.05, rho  # |rho| of two independent permutations of 10,000: sd 0.01
    # Two samples that share a batch in one epoch share one in the next with probability (B-1)/(N-1) = 0.0099.
    batch_of = np.empty(count, int)
    for step, samples in enumerate(second):
        batch_of[samples] = step
    together = sum(np.count_nonzero(batch_of[s][:, None] == batch_of[s][None, :]) - len(s)
                   for s in (np.array(step) for step in first)) / 2
    pairs = len(first) * batch * (batch - 1) / 2
    expected = (batch - 1) / (count - 1)
    assert abs(together / pairs / expected - 1) < 0.1, (together / pairs, expected)


def test_epoch_has_n_over_b_full_batches_and_the_rest_changes(small):
    truth = shardkit.read_samples(small, "train")
    loader = train_loader(small, 8, output=WITH_INDEX, reading=TWO_THREADS)
    assert len(loader) == 50 // 8 == loader.order.steps_per_epoch
    used = set()
    for _ in range(4):
        labels, positions = [], []
        for _, y, i in loader:
            assert len(i) == 8
            labels += y.tolist()
            positions += i.tolist()
        assert len(positions) == len(set(positions)) == 48  # 2 of the 50 wait for a later epoch
        assert labels == [truth[k][1] for k in positions]
        used |= set(positions)
    assert used == set(range(50)), "the samples left out differ between epochs"


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_are_the_same_on_any_number_of_ranks(small, world_size):
    one = epochs_of(train_loader(small, 8, output=WITH_INDEX, reading=ONE_THREAD), 2)
    parts = [epochs_of(train_loader(small, 8, rank=r, world_size=world_size, output=WITH_INDEX, reading=ONE_THREAD), 2)
             for r in range(world_size)]
    for epoch in range(2):
        for step, batch in enumerate(one[epoch]):
            ranks = [parts[r][epoch][step] for r in range(world_size)]
            assert all(len(p) == 8 // world_size for p in ranks)
            assert sum(ranks, []) == batch  # rank r takes the r-th part of the same global batch
    for r in range(world_size):
        assert set(sum(parts[r][0], [])) != set(sum(parts[r][1], [])), "a rank's samples change every epoch"


def test_augmentation_of_a_sample_does_not_depend_on_the_rank_count(tmp_path):
    """Textured images, so that a crop, a reflection or a lighting shift drawn differently would show."""
    rng = np.random.default_rng(0)
    items = [(np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((16, 16, 1))).astype(np.uint8), i % 4)
             for i in range(24)]
    data = shardkit.write_data(tmp_path, {"train": items}, shard_size=8)
    whole = [x.numpy() for x, _ in train_loader(data, 8, reading=ONE_THREAD)]
    for world_size in (2, 4):
        parts = [[x.numpy() for x, _ in train_loader(data, 8, rank=r, world_size=world_size, reading=ONE_THREAD)]
                 for r in range(world_size)]
        for step, x in enumerate(whole):
            assert np.array_equal(x, np.concatenate([part[step] for part in parts])), (world_size, step)
    reseeded = [x.numpy() for x, _ in train_loader(data, 8, seed=1, reading=ONE_THREAD)]
    assert not np.array_equal(whole[0], reseeded[0]), "a different seed draws other batches or augmentation"


def test_start_at_epoch_and_step_reads_nothing_before_it(small, monkeypatch):
    reference = epochs_of(train_loader(small, 8, output=WITH_INDEX, reading=ONE_THREAD), 3)
    requested = []
    samples = order_module.TrainSource.samples
    monkeypatch.setattr(order_module.TrainSource, "samples",
                        lambda self, epoch, step: requested.append((epoch, step)) or samples(self, epoch, step))
    resumed = train_loader(small, 8, epoch=1, start_step=4, output=WITH_INDEX, reading=ONE_THREAD)
    assert len(resumed) == 6 - 4
    rest, following = epochs_of(resumed, 2)
    assert rest == reference[1][4:] and following == reference[2]
    assert min(requested) == (1, 4), "nothing before the start was read"


def test_a_for_left_early_is_followed_by_the_next_epoch(small):
    reference = epochs_of(train_loader(small, 8, output=WITH_INDEX, reading=ONE_THREAD), 2)
    loader = train_loader(small, 8, output=WITH_INDEX, reading=ONE_THREAD)
    next(iter(loader))
    assert epochs_of(loader, 1)[0] == reference[1]


def test_steps_per_epoch_limits_every_epoch(small):
    loader = train_loader(small, 8, steps_per_epoch=2, output=WITH_INDEX, reading=ONE_THREAD)
    full = epochs_of(train_loader(small, 8, output=WITH_INDEX, reading=ONE_THREAD), 2)
    assert epochs_of(loader, 2) == [full[0][:2], full[1][:2]]


def test_bad_arguments_are_errors(small):
    with pytest.raises(ValueError, match="evenly"):
        train_loader(small, 8, world_size=3)
    with pytest.raises(ValueError, match="start_step"):
        train_loader(small, 8, start_step=6)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_loader(small, 64)


@pytest.mark.slow
def test_reader_workers_give_the_same_batches_and_outlive_the_stop_signals(small):
    """The GPU path's source: spawned worker processes. Slurm signals every process of a job step; the workers must
    keep reading until the trainer has stopped at its next sync point, and give the in-process order."""
    reference = epochs_of(train_loader(small, 8, output=WITH_INDEX, reading=ONE_THREAD), 2)
    loader = train_loader(small, 8, output=WITH_INDEX, reading=Reading(num_threads=1, reader_workers=2))
    batches = iter(loader)
    first = next(batches)[2].tolist()
    children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
    workers = [pid for pid in children if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
    assert len(workers) == 2, "the reader workers run as child processes"
    for pid in workers:
        for stop in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(int(pid), stop)
    time.sleep(1)
    rest = [index.tolist() for _, _, index in batches]
    assert [first, *rest] == reference[0] and epochs_of(loader, 1)[0] == reference[1]
