"""``k=v`` overrides are accepted anywhere on every command line (lmspec.cli)."""

from __future__ import annotations

import argparse

import pytest

from lmspec.cli import add_config_args


def _parity(argv):
    from parity.cli import build_parser

    return build_parser().parse_args(argv)


def _jaxlm(argv):
    from jaxlm.cli import build_parser

    return build_parser().parse_args(argv)


def _torchlm(argv):
    pytest.importorskip("torch")
    from torchlm.cli import _parser

    return _parser().parse_args(argv)


@pytest.mark.parametrize("argv,overrides", [
    (["run", "c.yaml", "--out", "D", "train.seed=1"], ["train.seed=1"]),
    (["run", "c.yaml", "a.b=1", "--out", "D", "train.seed=1", "--zero-stages", "1,3",
      "model.vocab_size=7"], ["a.b=1", "train.seed=1", "model.vocab_size=7"]),
    (["run", "--out", "D", "c.yaml", "x=2"], ["x=2"]),
    (["bench", "c.yaml", "--steps", "3", "train.precision=bf16"], ["train.precision=bf16"]),
    (["data", "c.yaml", "--steps", "2", "data.seed=4"], ["data.seed=4"]),
])
def test_parity_commands_take_overrides_anywhere(argv, overrides):
    args = _parity(argv)
    assert args.config == "c.yaml" and args.overrides == overrides


def test_jaxlm_train_override_after_a_flag():
    args = _jaxlm(["train", "c.yaml", "--no-progress", "train.steps=3", "--dump-grads", "0",
                   "data.seed=2"])
    assert args.no_progress and args.dump_grads == "0"
    assert args.overrides == ["train.steps=3", "data.seed=2"]


def test_torchlm_train_and_ds_config_override_after_a_flag():
    args = _torchlm(["train", "c.yaml", "--no-resume", "zero.stage=3"])
    assert args.no_resume and args.overrides == ["zero.stage=3"]
    assert _torchlm(["ds-config", "c.yaml", "zero.stage=2"]).overrides == ["zero.stage=2"]


@pytest.mark.parametrize("word", ["bogus", "--bogus", "=1", "1x=2"])
def test_other_stray_words_are_still_errors(word, capsys):
    with pytest.raises(SystemExit) as e:
        _jaxlm(["train", "c.yaml", "--no-progress", word])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_plain_parser_and_order_kept():
    p = argparse.ArgumentParser()
    add_config_args(p)
    p.add_argument("--flag", action="store_true")
    args = p.parse_args(["c.yaml", "a=1", "--flag", "b.c=2", "a=3"])
    assert args.overrides == ["a=1", "b.c=2", "a=3"] and args.flag


@pytest.mark.parametrize("command", [["run", "c.yaml", "--out", "D"], ["bench", "c.yaml"]])
def test_zero_stage_lists(command, capsys):
    assert _parity(command + ["--zero-stages", "3, 2,"]).zero_stages == (3, 2)
    with pytest.raises(SystemExit) as e:
        _parity(command + ["--zero-stages", "1,x"])
    assert e.value.code == 2
    assert "--zero-stages: '1,x': expected comma-separated ZeRO stages" in capsys.readouterr().err
