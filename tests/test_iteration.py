"""util/iteration.py and the poly schedule: iteration-based runs draw each update's batch from its update index only
(any resume point, across data epochs), and the released schedule's lr is the released log's."""

from __future__ import annotations

import pytest

from util.iteration import IterationSampler, Plan
from util.lr_sched import poly_lr_at, step_lr_at


@pytest.mark.parametrize("update, logged", [(49, 4.151e-07), (99, 8.383e-07), (15949, 1.144e-05),
                                            (159949, 4.051e-09)])
def test_poly_schedule_reproduces_the_released_log(update, logged):
    """Released log (DeepMIM-Seg.log, iterations 50, 100, 15950, 159950): the lr of the embeddings' group, scale
    0.9^13 at base 5e-5; mmcv logs the lr of the update just done, index iteration - 1."""
    lr = poly_lr_at(update, 5e-5, 160000, power=1.0, min_lr=0.0, warmup_iters=1500, warmup_ratio=1e-6) * 0.9 ** 13
    assert f"{lr:.3e}" == f"{logged:.3e}"


def test_poly_schedule_shape():
    assert poly_lr_at(0, 1.0, 100, warmup_iters=10, warmup_ratio=1e-6) == pytest.approx(1e-6, rel=1e-9)
    assert poly_lr_at(10, 1.0, 100, warmup_iters=10) == pytest.approx(0.9)  # warm-up over: the poly value
    assert poly_lr_at(50, 1.0, 100, power=2.0) == pytest.approx(0.25)
    assert poly_lr_at(100, 1.0, 100, min_lr=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("update, factor", [(0, 0.001), (125, 0.001 + 0.999 * 0.5), (250, 1.0), (163888, 1.0),
                                            (163889, 0.1), (177545, 0.1), (177546, 0.01), (184374, 0.01)])
def test_step_schedule_is_the_detection_benchmark_s(update, factor):
    """detectron2's WarmupParamScheduler(MultiStepParamScheduler([1, 0.1, 0.01], milestones [163889, 177546]),
    warm-up 250 updates from factor 0.001), the ViT detection benchmark's 100-epoch schedule at batch 64."""
    lr = step_lr_at(update, 1e-4, [163889, 177546], gamma=0.1, warmup_iters=250, warmup_factor=0.001)
    assert lr == pytest.approx(1e-4 * factor, rel=1e-12)


def test_sampler_batches_depend_only_on_the_update():
    whole = IterationSampler(range(10), batch_size=3, num_replicas=1, rank=0, seed=0)
    assert whole.steps_per_epoch == 3  # 10 samples: 3 full batches, the last sample dropped
    whole.set_range(0, 8)  # crosses two data-epoch boundaries
    items = list(whole)
    assert len(items) == len(whole) == 24
    assert [i.epoch for i in items[::3]] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert {i.index for i in items[:9]} | {i.index for i in items[9:18]} <= set(range(10))
    part = IterationSampler(range(10), batch_size=3, num_replicas=1, rank=0, seed=0)
    part.set_range(4, 8)  # a resume at micro-step 4
    assert list(part) == items[12:]


def test_sampler_ranks_take_disjoint_shards():
    shards = []
    for rank in range(2):
        sampler = IterationSampler(range(9), batch_size=2, num_replicas=2, rank=rank, seed=3)
        sampler.set_range(0, 2)  # one data epoch: 4 samples per rank, 2 batches
        shards.append({i.index for i in sampler})
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 4
    with pytest.raises(ValueError, match="--batch_size"):
        IterationSampler(range(3), batch_size=4, num_replicas=1, rank=0, seed=0)


def test_plan_intervals():
    plan = Plan(iters=160000, interval=16000, accum_iter=1)
    assert plan.intervals == 10 and plan.bounds(9) == (144000, 160000)
    assert Plan(10, 4, 2).intervals == 3 and Plan(10, 4, 2).bounds(2) == (8, 10)
