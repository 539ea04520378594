"""lmspec.schedule.lr_at against values worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmspec.config import ConfigError, OptimConfig, load_config
from lmspec.schedule import lr_at, lr_table

# lr 1.0 makes every value its own multiplier; warm-up 4 steps, cosine until step 14
OPT = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, decay_steps=14)


@pytest.mark.parametrize("step, expected", [
    (0, 0.25),   # (0 + 1) / 4: the first update already moves the weights
    (1, 0.5),
    (2, 0.75),
    (3, 1.0),    # last warm-up step reaches the peak
    (4, 1.0),    # cosine starts at its top: progress 0
    # progress (8 - 4) / 10 = 0.4: 0.1 + 0.45 * (1 + cos(0.4 pi)), cos(0.4 pi) = 0.309017
    (8, 0.1 + 0.45 * 1.3090169943749475),
    (9, 0.55),   # mid-cosine, progress 0.5: 0.1 + 0.9 / 2
    # progress 0.9: cos(0.9 pi) = -0.9510565163
    (13, 0.1 + 0.45 * (1 - 0.9510565162951535)),
    (14, 0.1),   # decay_steps: the floor min_lr_ratio * lr
    (15, 0.1),
    (10_000, 0.1),
])
def test_lr_at_hand_values(step, expected):
    assert lr_at(step, OPT) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_scaled_by_lr():
    opt = OptimConfig(lr=3e-4, min_lr_ratio=0.1, warmup_steps=4, decay_steps=14)
    for s in range(20):
        assert lr_at(s, opt) == pytest.approx(3e-4 * lr_at(s, OPT), rel=1e-12)


def test_no_warmup():
    opt = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=0, decay_steps=4)
    # step 0 is the top of the cosine; cos(pi/4) = sqrt(2)/2 at step 1
    assert lr_at(0, opt) == 2.0
    assert lr_at(1, opt) == pytest.approx(1.0 + math.sqrt(2) / 2, rel=1e-12)
    assert lr_at(2, opt) == pytest.approx(1.0, rel=1e-12)
    assert lr_at(4, opt) == 0.0
    assert lr_at(5, opt) == 0.0


def test_warmup_equal_to_decay_has_no_cosine():
    opt = OptimConfig(lr=1.0, min_lr_ratio=0.5, warmup_steps=2, decay_steps=2)
    assert [lr_at(s, opt) for s in range(4)] == [0.5, 1.0, 0.5, 0.5]


def test_shape_of_the_curve():
    lrs = lr_table(30, OPT)
    assert lrs == [lr_at(s, OPT) for s in range(30)]
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:4], strict=False))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert max(lrs) == 1.0 and min(lrs) == 0.1


def test_tiny_config_schedule():
    opt = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").optim
    assert lr_at(0, opt) == pytest.approx(opt.lr / opt.warmup_steps)
    assert lr_at(opt.decay_steps, opt) == pytest.approx(opt.lr * opt.min_lr_ratio)


def test_negative_step_and_bad_config():
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, OPT)
    with pytest.raises(ConfigError, match="optim.decay_steps"):
        OptimConfig(warmup_steps=10, decay_steps=5).validate()
