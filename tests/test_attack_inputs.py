"""Attack inputs: one planted fault per case, through the command line of ``jaxlm``,
``torchlm`` or ``parity``. Each must end with exit status 2 and one ``error: ...`` line on
stderr that names the problem (no traceback), and leave every file that was already in
the run / output folder byte-identical.

Most cases call the command's ``main`` in this process under :func:`lmspec.cli.run` (the
same code path as the console scripts, without an interpreter start each); a few run
the real command in a subprocess, where the process boundary is what is tested. Nothing
here trains: every fault is caught before the first step.

The last tests pin the policy itself: a ``UserError`` exits 2 with one line, anything
else is a bug (traceback, a line saying so, exit 1), ``LMSPEC_TRACEBACK=1`` shows the
traceback of a user error too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lmspec.cli import run
from lmspec.config import load_config
from lmspec.errors import UserError
from lmspec.weights import init_weights, save_safetensors

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# a model and data small enough that nothing takes long even if a fault were missed
SMALL = ["model.hidden_size=32", "model.num_hidden_layers=1", "model.intermediate_size=64",
         "model.num_attention_heads=2", "model.num_key_value_heads=1", "data.seq_len=16",
         "train.steps=1", "train.eval_every=0"]


# ----------------------------------------------------------------------------- helpers


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _jaxlm(argv: list[str]) -> int:
    from jaxlm.cli import _main

    return run(_main, argv)


def _torchlm(argv: list[str]) -> int:
    from torchlm.cli import _main

    return run(_main, argv)


def _parity(argv: list[str]) -> int:
    from parity.cli import _main

    return run(_main, argv)


CLIS: dict[str, Callable[[list[str]], int]] = {
    "jaxlm": _jaxlm, "torchlm": _torchlm, "parity": _parity}


@dataclass
class World:
    """The folder a case runs in: ``run/`` holds files from an earlier run (they must
    survive), ``corpus.txt`` a small text corpus, ``cache/`` the token cache."""

    root: Path

    @property
    def run(self) -> Path:
        return self.root / "run"

    def yaml(self, name: str, text: str) -> str:
        p = self.root / name
        p.write_text(text)
        return str(p)

    def data(self) -> list[str]:
        return [f"data.source=text:{self.root / 'corpus.txt'}",
                f"data.cache_dir={self.root / 'cache'}"]

    def weights(self, kind: str) -> str:
        """A safetensors file planted with a fault: garbage, truncated, empty, a folder."""
        p = self.root / f"{kind}.safetensors"
        if kind == "folder":
            p.mkdir()
            return str(p)
        good = self.root / "good.safetensors"
        if not good.exists():
            cfg = load_config(TINY, SMALL)
            save_safetensors(init_weights(cfg.model, 0), good)
        data = good.read_bytes()
        p.write_bytes({"garbage": bytes(range(256)) * 8, "truncated": data[: len(data) // 2],
                       "empty": b"", "header": data[:6]}[kind])
        return str(p)


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.run.mkdir()
    (w.run / "config.yaml").write_text("name: earlier\n")
    (w.run / "metrics.jsonl").write_text('{"step": 0, "loss": 5.0}\n')
    (w.run / "notes.txt").write_bytes(os.urandom(64))
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    return w


def _read_only_place() -> Path | None:
    """A folder nobody can write into, even root (sysfs, procfs), or None."""
    for p in (Path("/sys/kernel"), Path("/sys"), Path("/proc/1")):
        try:
            (p / "lmspec-probe").mkdir()
        except OSError:
            return p
        (p / "lmspec-probe").rmdir()  # pragma: no cover - writable after all
    return None  # pragma: no cover


# ----------------------------------------------------------------------------- the faults

# name -> (command, argv builder, words the error line must contain)
Case = tuple[str, Callable[[World], list[str]], tuple[str, ...]]


def _cfg_cases() -> dict[str, Case]:
    c: dict[str, Case] = {
        "empty yaml": ("torchlm", lambda w: ["ds-config", w.yaml("e.yaml", "")],
                       ("e.yaml", "is empty")),
        "comments-only yaml": ("torchlm", lambda w: ["ds-config", w.yaml("c.yaml", "# x\n")],
                               ("c.yaml", "is empty")),
        "empty yaml as base": ("torchlm", lambda w: ["ds-config", w.yaml(
            "top.yaml", f"base: {w.yaml('b.yaml', '')}\nname: x\n")], ("b.yaml", "is empty")),
        "yaml list at top": ("torchlm", lambda w: ["ds-config", w.yaml("l.yaml", "- 1\n")],
                             ("l.yaml", "mapping")),
        "section not a mapping": ("torchlm", lambda w: ["ds-config", w.yaml(
            "s.yaml", "train: 5\n")], ("s.yaml", "'train'", "mapping", "5")),
        "section not a mapping + override": ("torchlm", lambda w: ["ds-config", w.yaml(
            "s.yaml", "train: 5\n"), "train.steps=1"], ("s.yaml", "'train'", "mapping")),
        "section null + override": ("torchlm", lambda w: ["ds-config", w.yaml(
            "n.yaml", "optim:\n"), "optim.lr=0.1"], ("n.yaml", "'optim'", "mapping")),
        "section a list + override": ("torchlm", lambda w: ["ds-config", w.yaml(
            "li.yaml", "optim: [1, 2]\n"), "optim.lr=0.1"], ("li.yaml", "'optim'", "mapping")),
        "mesh.rules not a mapping + override": ("torchlm", lambda w: ["ds-config", w.yaml(
            "r.yaml", "mesh:\n  rules: 5\n"), "mesh.rules.embed=null"], ("mesh.rules",)),
        "config is a folder": ("torchlm", lambda w: ["ds-config", str(w.run)],
                               ("is a directory",)),
        "config missing": ("torchlm", lambda w: ["ds-config", str(w.root / "no.yaml")],
                           ("not found", "no.yaml")),
        "yaml lr .nan": ("torchlm", lambda w: ["ds-config", w.yaml(
            "nan.yaml", "optim:\n  lr: .nan\n")], ("optim.lr=nan", "finite")),
        "yaml rope_theta .inf": ("torchlm", lambda w: ["ds-config", w.yaml(
            "inf.yaml", "model:\n  rope_theta: .inf\n")], ("model.rope_theta=inf", "finite")),
        "train.steps=inf": ("torchlm", lambda w: ["ds-config", str(TINY), "train.steps=inf"],
                            ("train.steps",)),
    }
    for key, value in [("optim.lr", "nan"), ("optim.lr", "inf"), ("optim.lr", "-inf"),
                       ("optim.eps", "nan"), ("optim.grad_clip", "nan"),
                       ("optim.weight_decay", "inf"), ("optim.beta1", "nan"),
                       ("optim.min_lr_ratio", "nan"), ("model.rope_theta", "nan"),
                       ("model.rms_norm_eps", "nan"), ("data.val_fraction", "nan")]:
        c[f"{key}={value}"] = ("torchlm", lambda w, k=key, v=value: [
            "ds-config", str(TINY), f"{k}={v}"], (f"{key}=", "finite"))
    return c


def _generate_cases() -> dict[str, Case]:
    c: dict[str, Case] = {}
    for flag, value, words in [("--temperature", "nan", ("--temperature=nan", "finite")),
                               ("--temperature", "inf", ("--temperature=inf",)),
                               ("--temperature", "-1", ("--temperature=-1", ">= 0")),
                               ("--max-new-tokens", "-1", ("--max-new-tokens=-1", ">= 0"))]:
        c[f"generate {flag} {value}"] = ("jaxlm", lambda w, f=flag, v=value: [
            "generate", str(w.run), "--prompt", "x", f, v], (*words, "--help"))
    c["generate missing checkpoint"] = ("jaxlm", lambda w: [
        "generate", str(w.root / "nope"), "--prompt", "x"], ("checkpoint not found",))
    return c


def _train_argv(side: str, w: World, *extra: str) -> list[str]:
    return ["train", str(TINY), *SMALL, *w.data(), f"train.out_dir={w.run}",
            "--no-progress", *extra]


def _trainer_cases() -> dict[str, Case]:
    c: dict[str, Case] = {}
    for side in ("jaxlm", "torchlm"):
        for kind, words in [("garbage", ("garbage.safetensors", "not a readable")),
                            ("truncated", ("truncated.safetensors", "not a readable")),
                            ("empty", ("empty.safetensors", "not a readable")),
                            ("header", ("header.safetensors", "not a readable")),
                            ("folder", ("folder.safetensors", "a folder without config.json"))]:
            c[f"{side} --init-weights {kind}"] = (side, lambda w, s=side, k=kind: _train_argv(
                s, w, "--init-weights", w.weights(k)), words)
        c[f"{side} --init-weights missing"] = (side, lambda w, s=side: _train_argv(
            s, w, "--init-weights", str(w.root / "no.safetensors")), ("no.safetensors",))
        c[f"{side} out_dir is a file"] = (side, lambda w, s=side: _train_argv(
            s, w, f"train.out_dir={w.run / 'notes.txt'}"), ("train.out_dir", "notes.txt"))
        c[f"{side} out_dir under a file"] = (side, lambda w, s=side: _train_argv(
            s, w, f"train.out_dir={w.run / 'notes.txt' / 'sub'}"), ("train.out_dir",))
        c[f"{side} out_dir read-only"] = (side, lambda w, s=side: _train_argv(
            s, w, f"train.out_dir={_read_only_place() / 'run'}"), ("train.out_dir",))
        c[f"{side} out_dir without write permission"] = (side, lambda w, s=side: _train_argv(
            s, w, f"train.out_dir={_no_write(w)}"), ("train.out_dir", "not writable"))
        c[f"{side} --dump-grads x"] = (side, lambda w, s=side: _train_argv(
            s, w, "--dump-grads", "0,x"), ("--dump-grads",))
    return c


def _parity_cases() -> dict[str, Case]:
    small = ["--precisions", "fp32", "--zero-stages", "1"]
    return {
        "parity run --out is a file": ("parity", lambda w: [
            "run", str(TINY), *SMALL, *w.data(), "--out", str(w.run / "notes.txt"), *small],
            ("--out", "notes.txt")),
        "parity run --out under a file": ("parity", lambda w: [
            "run", str(TINY), *SMALL, *w.data(), "--out", str(w.run / "notes.txt" / "x"),
            *small], ("--out",)),
        "parity run --reuse-runs garbage weights": ("parity", lambda w: [
            "run", str(TINY), *SMALL, *w.data(), "--out", str(_plant_init(w)), *small,
            "--reuse-runs"], ("init_weights.safetensors", "not a readable")),
        "parity bench --json is a folder": ("parity", lambda w: [
            "bench", str(TINY), *SMALL, "--json", str(w.run)], ("--json", "folder")),
        "parity bench --json under a file": ("parity", lambda w: [
            "bench", str(TINY), *SMALL, "--json", str(w.run / "notes.txt" / "r.json")],
            ("--json", "notes.txt")),
        "parity bench --out is a file": ("parity", lambda w: [
            "bench", str(TINY), *SMALL, "train.warmup_steps_excluded=0", "--steps", "1",
            "--out", str(w.run / "notes.txt")], ("--out", "notes.txt")),
        "parity sweep --out is a file": ("parity", lambda w: [
            "sweep", "--out", str(w.run / "notes.txt"), "--cases", "tiny-seed0"],
            ("--out", "notes.txt")),
        "parity data --steps 0": ("parity", lambda w: [
            "data", str(TINY), *w.data(), "--steps", "0"], ("--steps=0",)),
        "data.cache_dir is a file": ("parity", lambda w: [
            "data", str(TINY), w.data()[0], f"data.cache_dir={w.run / 'notes.txt'}"],
            ("notes.txt", "Not a directory")),
        "data.source missing": ("parity", lambda w: [
            "data", str(TINY), f"data.source={w.root / 'no.txt'}", w.data()[1]],
            ("data.source", "no.txt")),
        "data.source jsonl not JSON": ("parity", lambda w: [
            "data", str(TINY), f"data.source=jsonl:{w.root / 'corpus.txt'}", w.data()[1]],
            ("data.source", "not valid JSON")),
        "data.tokenizer missing": ("parity", lambda w: [
            "data", str(TINY), *w.data(), f"data.tokenizer={w.root / 'tok.json'}"],
            ("data.tokenizer", "tok.json")),
        "data.tokenizer not a tokenizer.json": ("parity", lambda w: [
            "data", str(TINY), *w.data(), f"data.tokenizer={_plant_tokenizer(w)}"],
            ("data.tokenizer", "not a tokenizer.json")),
    }


def _plant_tokenizer(w: World) -> Path:
    p = w.root / "bad.json"
    p.write_text("not json at all")
    return p


def _no_write(w: World) -> Path:
    folder = w.root / "locked"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    return folder


def _plant_init(w: World) -> Path:
    (w.run / "init_weights.safetensors").write_bytes(b"\x00" * 100)
    return w.run


CASES: dict[str, Case] = {**_cfg_cases(), **_generate_cases(), **_trainer_cases(),
                          **_parity_cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_attack_input(name: str, world: World, capsys, monkeypatch) -> None:
    cli, argv_of, words = CASES[name]
    if "read-only" in name and _read_only_place() is None:  # pragma: no cover
        pytest.skip("no read-only folder on this machine")
    if "without write permission" in name and os.geteuid() == 0:
        pytest.skip("root writes through file permissions; the read-only case covers it")
    if cli == "jaxlm":
        pytest.importorskip("jax")
    else:
        pytest.importorskip("torch")
    monkeypatch.chdir(world.root)
    monkeypatch.delenv("LMSPEC_TRACEBACK", raising=False)
    argv = argv_of(world)
    before = _hashes(world.run)
    capsys.readouterr()
    rc = CLIS[cli](argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    after = _hashes(world.run)
    assert {k: after.get(k) for k in before} == before, "a pre-existing file changed"


# ----------------------------------------------------------------------------- the boundary


def _process(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LMSPEC_TRACEBACK"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("argv, words", [
    (["-m", "torchlm.cli", "ds-config", "EMPTY"], ("e.yaml", "is empty")),
    (["-m", "jaxlm.cli", "generate", "RUN", "--prompt", "x", "--temperature", "nan"],
     ("--temperature=nan",)),
    (["-m", "parity.cli", "run", str(TINY), "--out", "RUN/notes.txt"], ("--out",)),
])
def test_attack_input_process(argv: list[str], words: tuple[str, ...], world: World) -> None:
    """The real commands: exit status 2, one stderr line, nothing on stdout."""
    empty = world.yaml("e.yaml", "")
    argv = [a.replace("EMPTY", empty).replace("RUN", str(world.run)) for a in argv]
    before = _hashes(world.run)
    proc = _process(*argv, cwd=world.root)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert proc.stdout == ""
    assert _hashes(world.run) == before


def test_generate_checks_sampling_before_loading() -> None:
    """The library entry rejects a NaN temperature before it opens anything."""
    pytest.importorskip("jax")
    from jaxlm.generate import generate_from_checkpoint

    with pytest.raises(UserError, match="--temperature=nan"):
        generate_from_checkpoint("/nonexistent", "x", temperature=float("nan"))


# ----------------------------------------------------------------------------- the policy


def _raises(exc: BaseException) -> Callable[[object], int]:
    def main(argv: object) -> int:
        raise exc
    return main


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("k"), TypeError("t"),
                                 ValueError("an internal invariant")])
def test_a_bug_shows_its_traceback_and_exits_1(exc: BaseException, capsys,
                                               monkeypatch) -> None:
    monkeypatch.delenv("LMSPEC_TRACEBACK", raising=False)
    assert run(_raises(exc)) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    last = err.strip().splitlines()[-1]
    assert "bug in jaxlm-parity" in last and type(exc).__name__ in last
    assert "report" in last


def test_a_worker_lets_a_bug_propagate(capsys) -> None:
    """torchrun workers: the bug reaches ``@record`` (the launcher names it as the root
    cause); a user error is still one line, exit 2."""
    with pytest.raises(RuntimeError, match="boom"):
        run(_raises(RuntimeError("boom")), raise_bugs=True)
    assert run(_raises(UserError("bad")), raise_bugs=True) == 2


def test_a_bug_inside_a_command_exits_1(world: World, capsys, monkeypatch) -> None:
    """A fault planted inside a real command (the config loader raising KeyError)."""
    import lmspec.cli

    def broken(*a: object, **k: object) -> None:
        raise KeyError("planted")

    monkeypatch.setattr(lmspec.cli, "load_config", broken)
    assert _parity(["data", str(TINY)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'planted'" in err
    assert "bug in jaxlm-parity" in err.strip().splitlines()[-1]


def test_a_user_error_is_one_line_exit_2(capsys, monkeypatch) -> None:
    monkeypatch.delenv("LMSPEC_TRACEBACK", raising=False)
    assert run(_raises(UserError("train.steps=0 must be > 0\nsecond line"))) == 2
    err = capsys.readouterr().err
    assert err == "error: train.steps=0 must be > 0 second line\n"


def test_a_path_error_is_a_user_error(tmp_path: Path, capsys) -> None:
    def main(argv: object) -> int:
        (tmp_path / "f").write_text("x")
        (tmp_path / "f").mkdir()
        return 0

    assert run(main) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "f") in err and "Traceback" not in err


def test_traceback_on_request_keeps_exit_2(capsys, monkeypatch) -> None:
    monkeypatch.setenv("LMSPEC_TRACEBACK", "1")
    assert run(_raises(UserError("bad key"))) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error: bad key"


def test_keyboard_interrupt_exits_130(capsys) -> None:
    assert run(_raises(KeyboardInterrupt())) == 130


def test_nan_config_never_reaches_ds_config(capsys) -> None:
    """``torchlm ds-config`` prints no NaN: the config is refused first."""
    pytest.importorskip("torch")
    assert _torchlm(["ds-config", str(TINY), "optim.grad_clip=nan"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "NaN" not in err


def test_override_into_a_section_that_is_not_a_mapping() -> None:
    """``from_dict`` (no file): the override names the key instead of replacing the
    section with defaults."""
    from lmspec.config import from_dict

    with pytest.raises(UserError, match="train: expected a mapping, got 5; cannot set "
                       "train.steps"):
        from_dict({"train": 5}, ["train.steps=1"])
    with pytest.raises(UserError, match="mesh.rules: expected a mapping"):
        from_dict({"mesh": {"rules": 5}}, ["mesh.rules.embed=null"])


def test_finite_check_holds_for_direct_construction() -> None:
    from lmspec.config import ExperimentConfig, OptimConfig

    with pytest.raises(UserError, match="optim.lr=nan"):
        ExperimentConfig(optim=OptimConfig(lr=float("nan"))).validate()
    assert np.isfinite(ExperimentConfig().validate().optim.lr)


def test_generate_draws_only_ids_the_tokenizer_decodes() -> None:
    """``model.vocab_size`` (512) padded past the byte tokenizer's 259 ids: sampling from
    an untrained model drew ids the tokenizer cannot decode, and the command ended in a
    ValueError traceback after printing nothing."""
    pytest.importorskip("jax")
    from flax import nnx

    from jaxlm.generate import sample
    from jaxlm.model import Llama

    cfg = load_config(TINY, SMALL)
    model = Llama(cfg.model, rngs=nnx.Rngs(0), scan_layers=cfg.train.scan_layers)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ids = sample(cfg, params, [1, 2, 3], max_new_tokens=12, temperature=1.0, seed=0,
                 num_ids=259)
    assert len(ids) == 12 and max(ids) < 259
