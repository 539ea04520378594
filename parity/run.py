"""The parity run: one set of weights and batches, both trainers, every check.

Phases:
 1. data: build (or reuse) the token cache once, so the trainers never race to build it;
 2. weights: ``lmspec.weights.init_weights(model, train.seed)`` written as safetensors;
 3. forward: in-process logits of ``jaxlm.api`` vs ``torchlm.api`` vs Hugging Face's
    ``LlamaForCausalLM`` on a validation batch (JAX on one device, imported lazily);
 4. training: ``jaxlm train`` and ``torchlm train`` as subprocesses, one per precision
    (and ZeRO stage for DeepSpeed), each from the same weights with step-0 gradient and
    parameter dumps, in its own ``out_dir``;
 5. checks (limits from :mod:`parity.limits`) and reports.

The judged pairs and noise floors:
 - fp32: JAX vs DeepSpeed fp32 of each stage; floor = DeepSpeed first stage vs last stage.
 - bf16: JAX bf16 vs DeepSpeed bf16 of each stage; floor = DeepSpeed bf16 vs DeepSpeed
   fp32 of the same stage (so DeepSpeed fp32 runs as long as the bf16 runs).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lmspec.config import ExperimentConfig, OptimConfig, save_config
from lmspec.metrics import read_metrics
from lmspec.weights import init_weights, load_safetensors, save_safetensors
from parity import compare as C
from parity.limits import BF16_EARLY_STEPS, BF16_STEPS, FP32_LOSS_STEPS
from parity.profiles import force_parity_profile

SIDES = ("jax", "torch")
DEFAULT_ZERO_STAGES = (1, 2, 3)
DEFAULT_PRECISIONS = ("fp32", "bf16")
FORWARD_ROWS = 4  # validation windows in the forward comparison
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "deepspeed",
                    "transformers", "numpy", "safetensors")


def log(msg: str) -> None:
    """One progress line, flushed (the harness's own output goes to stdout)."""
    print(f"[parity] {msg}", flush=True)


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class RunSpec:
    """One trainer subprocess."""

    label: str
    side: str  # "jax" | "torch"
    precision: str
    zero_stage: int | None
    steps: int
    out_dir: Path


def run_label(side: str, precision: str, zero_stage: int | None) -> str:
    return f"jax {precision}" if side == "jax" else f"ds zero{zero_stage} {precision}"


def plan_runs(out: Path, zero_stages: Sequence[int], precisions: Sequence[str],
              steps_fp32: int, steps_bf16: int) -> list[RunSpec]:
    """The trainer runs a parity run needs (each run once)."""
    runs: list[RunSpec] = []

    def add(side: str, prec: str, stage: int | None, steps: int) -> None:
        label = run_label(side, prec, stage)
        name = label.replace(" ", "_")
        runs.append(RunSpec(label, side, prec, stage, steps, out / "runs" / name))

    # DeepSpeed fp32 also serves as the bf16 floor, so it runs as long as bf16 does
    ds_fp32_steps = max(steps_fp32 if "fp32" in precisions else 0,
                        steps_bf16 if "bf16" in precisions else 0)
    if "fp32" in precisions:
        add("jax", "fp32", None, steps_fp32)
    if "bf16" in precisions:
        add("jax", "bf16", None, steps_bf16)
    for stage in zero_stages:
        add("torch", "fp32", stage, ds_fp32_steps)
        if "bf16" in precisions:
            add("torch", "bf16", stage, steps_bf16)
    return runs


# ----------------------------------------------------------------------------- subprocesses


def entry_cmd(pkg: str) -> list[str]:
    """Run ``<pkg>.cli:main`` with this interpreter (no PATH needed); its return value or
    SystemExit becomes the exit status."""
    code = f"import sys; from {pkg}.cli import main; sys.argv[0] = {pkg!r}; sys.exit(main())"
    return [sys.executable, "-c", code]


def default_trainer_cmd(side: str) -> list[str]:
    """``jaxlm train`` / ``torchlm train`` with this interpreter."""
    return entry_cmd("jaxlm" if side == "jax" else "torchlm")


def gpu_available() -> bool:
    """An NVIDIA GPU is visible (checked without importing jax or torch)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def jax_env(base: Mapping[str, str], cpu_devices: int | None) -> dict[str, str]:
    """Environment of a JAX subprocess: on CPU exactly ``cpu_devices`` virtual devices."""
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"
    if cpu_devices is not None:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={cpu_devices}"
                            ).strip()
        env["JAX_PLATFORMS"] = "cpu"
    return env


def trainer_args(spec: RunSpec, config_path: Path, init_path: Path | None,
                 dump: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """Arguments after the trainer command: the contract's flags for one run."""
    args = ["train", str(config_path),
            f"train.steps={spec.steps}", f"train.precision={spec.precision}",
            f"train.out_dir={spec.out_dir}",
            # validation does not touch training state; leaving it out saves time
            "train.eval_every=0"]
    if spec.zero_stage is not None:
        args.append(f"zero.stage={spec.zero_stage}")
    args += list(extra)
    if init_path is not None:
        args += ["--init-weights", str(init_path)]
    if dump:
        args += ["--dump-grads", "0", "--dump-params", "0"]
    args.append("--no-resume")
    return args


def run_trainer(cmd: list[str], env: Mapping[str, str], out_dir: Path, steps: int,
                label: str, timeout_s: float | None = None) -> tuple[int, float, str]:
    """Run one trainer, log to ``out_dir/train.log``, show a progress bar fed by its
    ``metrics.jsonl``. Returns (exit status, seconds, last lines of the log)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    logfile = out_dir / "train.log"
    metrics = out_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    with open(logfile, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=dict(env),
                                start_new_session=True)
        bar = tqdm(total=steps, desc=f"  {label}", unit="step", leave=False, disable=None,
                   file=sys.stderr)
        done = 0
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                    _kill(proc)
                    rc = 124
                    lf.write(f"\n[parity] killed after {timeout_s:.0f} s (timeout)\n")
                    break
                n = _count_lines(metrics)
                if n > done:
                    bar.update(n - done)
                    done = n
        except BaseException:
            _kill(proc)
            raise
        finally:
            bar.close()
    elapsed = time.perf_counter() - t0
    tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
    return rc, elapsed, tail


def _kill(proc: subprocess.Popen) -> None:
    """End the trainer and the workers it started (its own process group)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


# ----------------------------------------------------------------------------- run data


@dataclass
class RunData:
    """What one trainer left behind."""

    spec: RunSpec
    metrics: list[dict[str, Any]] = field(default_factory=list)
    grads0: dict[str, np.ndarray] | None = None
    params0: dict[str, np.ndarray] | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0

    def series(self, key: str, steps: int | None = None) -> list[Any]:
        recs = sorted(self.metrics, key=lambda r: r["step"])
        vals = [r[key] for r in recs]
        return vals if steps is None else vals[:steps]


def read_run(spec: RunSpec, dumps: bool = True) -> RunData:
    """Read metrics.jsonl, run_summary.json and the step-0 dumps of a finished run."""
    data = RunData(spec)
    d = spec.out_dir
    data.metrics = read_metrics(d / "metrics.jsonl")
    steps = sorted(r["step"] for r in data.metrics)
    if steps != list(range(spec.steps)):
        raise ValueError(f"{spec.label}: metrics.jsonl has steps {steps[:5]}... "
                         f"({len(steps)} records), expected 0..{spec.steps - 1}")
    summary = d / "run_summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{spec.label}: {summary} was not written")
    data.summary = json.loads(summary.read_text())
    if dumps:
        data.grads0 = load_safetensors(d / "dumps" / "grads_step0.safetensors")
        data.params0 = load_safetensors(d / "dumps" / "params_step0.safetensors")
    return data


# ----------------------------------------------------------------------------- forward


def forward_logits(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                   tokens_bt: np.ndarray, precisions: Sequence[str]
                   ) -> dict[str, np.ndarray]:
    """In-process logits: ``jax <prec>``, ``torch <prec>`` for each precision and
    ``hf fp32``. JAX is imported here, not at module import."""
    from jaxlm import api as japi
    from torchlm import api as tapi

    w = dict(weights)
    out = {}
    for prec in precisions:
        out[f"jax {prec}"] = np.asarray(japi.logits(cfg, w, tokens_bt, prec), np.float32)
        out[f"torch {prec}"] = np.asarray(tapi.logits(cfg, w, tokens_bt, prec), np.float32)
    out["hf fp32"] = np.asarray(tapi.hf_logits(cfg, w, tokens_bt), np.float32)
    return out


def forward_checks(logits: Mapping[str, np.ndarray]
                   ) -> tuple[dict[str, dict[str, float]], list[C.Check], list[dict]]:
    """Forward statistics, the fp32 logits checks and bf16 figures (no bf16 limit)."""
    stats: dict[str, dict[str, float]] = {}
    checks: list[C.Check] = []
    info: list[dict] = []
    pairs = [("jax fp32", "torch fp32"), ("jax fp32", "hf fp32"), ("torch fp32", "hf fp32"),
             ("jax bf16", "torch bf16"), ("jax bf16", "hf fp32"), ("torch bf16", "hf fp32")]
    for test, ref in pairs:
        if test in logits and ref in logits:
            stats[f"{test} vs {ref}"] = C.logits_stats(logits[test], logits[ref])
    for ref, nice in (("torch fp32", "torch"), ("hf fp32", "Hugging Face")):
        key = f"jax fp32 vs {ref}"
        if key in stats:
            s = stats[key]
            checks.append(C.make_check(f"fp32 forward: logits max abs diff, jax vs {nice}",
                                       "fp32.logits_max_abs", s["max_abs"],
                                       max_rel=s["max_rel"], mean_kl=s["mean_kl"]))
    for key, s in stats.items():
        info.append({"name": f"forward {key}: mean KL per token", "value": s["mean_kl"],
                     "note": f"max abs {s['max_abs']:.3e}, max rel {s['max_rel']:.3e}"})
    return stats, checks, info


# ----------------------------------------------------------------------------- checks


def _nan_check(name: str, key: str, why: str) -> C.Check:
    return C.make_check(name, key, math.nan, missing=why)


def _floor(floors: Mapping[str, float], key: str, name: str) -> dict[str, Any]:
    return {"floor": floors[key], "floor_from": name} if key in floors else {}


def _get(runs: Mapping[str, RunData], label: str) -> RunData | None:
    r = runs.get(label)
    return r if r is not None and r.error is None else None


def training_checks(runs: Mapping[str, RunData], init: Mapping[str, np.ndarray],
                    zero_stages: Sequence[int], precisions: Sequence[str],
                    optim: OptimConfig | None = None
                    ) -> tuple[list[C.Check], list[dict], list[dict]]:
    """Every training check of the issue, from the runs' metrics and dumps.

    Returns (checks, info figures, pairs for the plots). A check whose inputs are missing
    (a run failed) is reported with value NaN, which fails it."""
    checks: list[C.Check] = []
    info: list[dict] = []
    pairs: list[dict] = []

    def fingerprint_check(name: str, pairs_: Sequence[tuple[RunData, RunData]]) -> None:
        bad: dict[str, list[int]] = {}
        total = 0
        for a, b in pairs_:
            n = min(a.spec.steps, b.spec.steps)
            mm = C.fingerprint_mismatches(a.metrics, b.metrics, n)
            total += len(mm)
            if mm:
                bad[f"{a.spec.label} vs {b.spec.label}"] = mm[:10]
        checks.append(C.make_check(name, "batch_fingerprint_mismatches", total,
                                   **({"mismatched_steps": bad} if bad else {})))

    # ---- fp32
    if "fp32" in precisions:
        jax = _get(runs, "jax fp32")
        ds_runs = {s: _get(runs, run_label("torch", "fp32", s)) for s in zero_stages}
        # noise floor: two DeepSpeed set-ups that should agree (first vs last stage)
        floor_abs: list[float] = []
        floor_name = ""
        floors: dict[str, float] = {}  # same statistic between two DeepSpeed set-ups
        ok_stages = [s for s in zero_stages if ds_runs[s] is not None]
        if len(ok_stages) >= 2:
            sa, sb = ok_stages[0], ok_stages[-1]
            a, b = ds_runs[sa], ds_runs[sb]
            floor_name = f"ds zero{sa} vs zero{sb} fp32"
            n = min(FP32_LOSS_STEPS, a.spec.steps, b.spec.steps)
            la, lb = a.series("loss", n), b.series("loss", n)
            floor_abs = C.abs_diff_series(la, lb)
            rel = C.rel_diff_series(la, lb)
            floors["loss"] = max(rel)
            info.append({"name": f"fp32 noise floor: loss rel diff, {floor_name}",
                         "value": max(rel),
                         "note": f"worst of {n} steps (step {int(np.argmax(rel))})"})
            if a.grads0 is not None and b.grads0 is not None:
                g = C.per_param(a.grads0, b.grads0)
                p, v = C.worst(g, "rel_err")
                floors["grad"] = v
                info.append({"name": f"fp32 noise floor: grad rel err, {floor_name}",
                             "value": v, "note": f"worst parameter {p}"})
            if a.params0 is not None and b.params0 is not None:
                u = C.per_param(C.updates(a.params0, init), C.updates(b.params0, init))
                p, v = C.worst(u, "rel_err")
                floors["update"] = v
                info.append({"name": f"fp32 noise floor: update rel err, {floor_name}",
                             "value": v, "note": f"worst parameter {p}"})
        else:
            info.append({"name": "fp32 noise floor", "value": None,
                         "note": "not measured: needs two finished ZeRO stages"})
        for s in zero_stages:
            tag = f"fp32 zero{s}"
            ds = ds_runs[s]
            pair: dict[str, Any] = {"name": f"{tag}: jax vs deepspeed", "precision": "fp32",
                                    "test": "jax fp32", "ref": run_label("torch", "fp32", s),
                                    "floor_name": floor_name, "floor_abs_diff": floor_abs}
            if jax is None or ds is None:
                why = "run failed: " + ", ".join(
                    lbl for lbl, r in (("jax fp32", jax), (pair["ref"], ds)) if r is None)
                for what, key in (("grad rel err (worst parameter)", "fp32.grad_rel_err"),
                                  ("update rel err (worst parameter)", "fp32.update_rel_err"),
                                  ("loss rel diff (worst step)", "fp32.loss_rel_diff"),
                                  ("batch fingerprint mismatches",
                                   "batch_fingerprint_mismatches")):
                    checks.append(_nan_check(f"{tag}: {what}", key, why))
                continue
            g = C.per_param(jax.grads0, ds.grads0)
            p, v = C.worst(g, "rel_err")
            gn_j, gn_d = C.global_norm(jax.grads0), C.global_norm(ds.grads0)
            checks.append(C.make_check(f"{tag}: grad rel err (worst parameter)",
                                       "fp32.grad_rel_err", v, param=p,
                                       global_norm_jax=gn_j, global_norm_ds=gn_d,
                                       **_floor(floors, "grad", floor_name)))
            info.append({"name": f"{tag}: step-0 global grad norm rel diff",
                         "value": abs(gn_j - gn_d) / gn_d if gn_d else math.nan,
                         "note": f"from the dumps; jax {gn_j:.6g}, deepspeed {gn_d:.6g}"})
            u = C.per_param(C.updates(jax.params0, init), C.updates(ds.params0, init))
            p, v = C.worst(u, "rel_err")
            checks.append(C.make_check(f"{tag}: update rel err (worst parameter)",
                                       "fp32.update_rel_err", v, param=p, stage=s,
                                       **_floor(floors, "update", floor_name)))
            if optim is not None:
                info += update_diagnosis(tag, p, jax, ds, init, optim)
            n = min(FP32_LOSS_STEPS, jax.spec.steps, ds.spec.steps)
            lj, ld = jax.series("loss", n), ds.series("loss", n)
            rel = C.rel_diff_series(lj, ld)
            worst_step = int(np.argmax(rel))
            checks.append(C.make_check(f"{tag}: loss rel diff (worst of {n} steps)",
                                       "fp32.loss_rel_diff", max(rel), step=worst_step,
                                       **_floor(floors, "loss", floor_name)))
            fingerprint_check(f"{tag}: batch fingerprint mismatches", [(jax, ds)])
            gn_rel = C.rel_diff_series(jax.series("grad_norm", n), ds.series("grad_norm", n))
            info.append({"name": f"{tag}: grad_norm rel diff (worst of {n} steps)",
                         "value": max(gn_rel), "note": "metrics.jsonl, before clipping"})
            lr_d = C.abs_diff_series(jax.series("lr", n), ds.series("lr", n))
            info.append({"name": f"{tag}: lr abs diff (worst of {n} steps)",
                         "value": max(lr_d), "note": "both from lmspec.schedule.lr_at"})
            pair.update(loss_abs_diff=C.abs_diff_series(lj, ld), loss_rel_diff=rel,
                        grad=g, update=u)
            pairs.append(pair)

    # ---- bf16
    if "bf16" in precisions:
        jax = _get(runs, "jax bf16")
        for s in zero_stages:
            tag = f"bf16 zero{s}"
            ds = _get(runs, run_label("torch", "bf16", s))
            ds32 = _get(runs, run_label("torch", "fp32", s))
            pair = {"name": f"{tag}: jax vs deepspeed", "precision": "bf16",
                    "test": "jax bf16", "ref": run_label("torch", "bf16", s),
                    "floor_name": f"ds zero{s} bf16 vs fp32"}
            if jax is None or ds is None or ds32 is None:
                why = "run failed: " + ", ".join(
                    lbl for lbl, r in (("jax bf16", jax), (pair["ref"], ds),
                                       (run_label("torch", "fp32", s), ds32)) if r is None)
                for what, key in (("loss rel diff at step 0", "bf16.loss_rel_diff_step0"),
                                  ("grad cosine (worst parameter)", "bf16.grad_cosine"),
                                  (f"gap/floor over {BF16_STEPS} steps", "bf16.gap_over_floor"),
                                  (f"gap/floor over first {BF16_EARLY_STEPS} steps",
                                   "bf16.gap_over_floor_early"),
                                  ("batch fingerprint mismatches",
                                   "batch_fingerprint_mismatches")):
                    checks.append(_nan_check(f"{tag}: {what}", key, why))
                continue
            l0 = C.rel_diff_series(jax.series("loss", 1), ds.series("loss", 1))[0]
            checks.append(C.make_check(f"{tag}: loss rel diff at step 0",
                                       "bf16.loss_rel_diff_step0", l0))
            g = C.per_param(jax.grads0, ds.grads0)
            p, v = C.worst(g, "cosine", largest=False)
            checks.append(C.make_check(f"{tag}: grad cosine (worst parameter)",
                                       "bf16.grad_cosine", v, param=p))
            n = min(BF16_STEPS, jax.spec.steps, ds.spec.steps, ds32.spec.steps)
            lj, ld, l32 = jax.series("loss", n), ds.series("loss", n), ds32.series("loss", n)
            for m, key, what in ((n, "bf16.gap_over_floor", f"over {n} steps"),
                                 (min(BF16_EARLY_STEPS, n), "bf16.gap_over_floor_early",
                                  f"over first {min(BF16_EARLY_STEPS, n)} steps")):
                gap, floor = C.rms_gap(lj[:m], ld[:m]), C.rms_gap(ld[:m], l32[:m])
                checks.append(C.make_check(f"{tag}: gap/floor {what}", key,
                                           C.gap_over_floor(gap, floor), gap=gap, floor=floor))
            fingerprint_check(f"{tag}: batch fingerprint mismatches", [(jax, ds), (ds, ds32)])
            u = C.per_param(C.updates(jax.params0, init), C.updates(ds.params0, init))
            p_u, v_u = C.worst(u, "rel_err")
            info.append({"name": f"{tag}: update rel err (worst parameter)", "value": v_u,
                         "note": f"{p_u}; no bf16 limit in the issue"})
            pair.update(loss_abs_diff=C.abs_diff_series(lj, ld),
                        floor_abs_diff=C.abs_diff_series(ld, l32), grad=g, update=u)
            pairs.append(pair)

    # every run saw the same batches as the JAX run of its precision (and JAX fp32 as bf16)
    j32, j16 = _get(runs, "jax fp32"), _get(runs, "jax bf16")
    if j32 is not None and j16 is not None:
        fingerprint_check("jax fp32 vs jax bf16: batch fingerprint mismatches", [(j32, j16)])
    return checks, info, pairs


def update_diagnosis(tag: str, param: str, jax: RunData, ds: RunData,
                     init: Mapping[str, np.ndarray], optim: OptimConfig) -> list[dict]:
    """Which term makes the step-0 updates of ``param`` differ.

    Applies an exact (float64) clipped AdamW first step to each side's dumped gradient:
    if ``AdamW(g_jax)`` vs ``AdamW(g_ds)`` differs as much as the measured updates while
    each side's update matches ``AdamW`` of its own gradient, the optimizers are faithful
    and the difference comes from the gradients, amplified by Adam's first-step
    normalisation ``g / (|g| + eps)`` where ``|g|`` is near ``eps``. Also names the single
    element that dominates the difference."""
    ua = C.updates({param: jax.params0[param]}, {param: init[param]})[param]
    ub = C.updates({param: ds.params0[param]}, {param: init[param]})[param]
    ea = C.adamw_first_update(jax.grads0, init, optim, param)
    eb = C.adamw_first_update(ds.grads0, init, optim, param, clip_eps=1e-6)
    sq = ((ua - ub) ** 2).ravel()
    i = int(np.argmax(sq))
    share = float(sq[i] / sq.sum()) if sq.sum() > 0 else 0.0
    rest = math.sqrt(max(float(sq.sum() - sq[i]), 0.0)) / max(float(np.linalg.norm(ub)), 1e-300)
    gj = float(np.asarray(jax.grads0[param]).ravel()[i])
    gd = float(np.asarray(ds.grads0[param]).ravel()[i])
    clip = C.clip_coef(ds.grads0, optim.grad_clip, 1e-6)
    idx = tuple(int(x) for x in np.unravel_index(i, ua.shape))
    return [
        {"name": f"{tag}: update diagnosis, exact AdamW(g_jax) vs AdamW(g_ds)",
         "value": C.rel_l2_error(ea, eb),
         "note": f"{param}: the update difference the gradient difference alone produces"},
        {"name": f"{tag}: update diagnosis, jax update vs exact AdamW of its own gradient",
         "value": C.rel_l2_error(ua, ea), "note": f"{param}: optax vs float64 AdamW"},
        {"name": f"{tag}: update diagnosis, deepspeed update vs exact AdamW of its own "
                 "gradient", "value": C.rel_l2_error(ub, eb),
         "note": f"{param}: torch AdamW under ZeRO vs float64 AdamW"},
        {"name": f"{tag}: update diagnosis, share of the squared difference in one element",
         "value": share,
         "note": f"{param}{list(idx)}: grad jax {gj:.4e} vs deepspeed {gd:.4e}; clipped "
                 f"|g| = {abs(gd) * clip:.2e} vs eps {optim.eps:g} (tensor RMS grad "
                 f"{float(np.sqrt(np.mean(np.square(ds.grads0[param], dtype=np.float64)))):.2e})"
                 f"; update {ua.ravel()[i]:.4e} vs {ub.ravel()[i]:.4e}",
         "element": list(idx)},
        {"name": f"{tag}: update diagnosis, update rel err without that element",
         "value": rest, "note": f"{param}: the other {ua.size - 1} elements"},
    ]


def float64_gradient(cfg: ExperimentConfig, weights: Mapping[str, np.ndarray],
                     windows: np.ndarray) -> dict[str, np.ndarray]:
    """Step-0 gradient of the global token-mean loss computed in float64 (the torch
    module cast to float64): a ground truth neither fp32 side can reach."""
    import torch

    from torchlm import api as tapi

    model = tapi.build_model(cfg.model, dict(weights), "fp32").double()
    loss = model.loss(torch.from_numpy(np.asarray(windows, np.int64)))
    loss.backward()
    return {k: p.grad.detach().numpy() for k, p in model.named_parameters()}


def truth_diagnosis(tag: str, param: str, jax: RunData, ds: RunData,
                    init: Mapping[str, np.ndarray], optim: OptimConfig,
                    g64: Mapping[str, np.ndarray]) -> list[dict]:
    """Each side's measured step-0 update of ``param`` against exact AdamW applied to the
    float64 gradient: how far each fp32 side is from the truth."""
    exact = C.adamw_first_update(g64, init, optim, param)
    i = int(np.argmax((jax.params0[param].astype(np.float64) - ds.params0[param]) ** 2))
    out = [{"name": f"{tag}: update diagnosis, float64 gradient of that element",
            "value": float(np.asarray(g64[param]).ravel()[i]),
            "note": f"{param}: fp32 gradients jax {float(jax.grads0[param].ravel()[i]):.4e}, "
                    f"deepspeed {float(ds.grads0[param].ravel()[i]):.4e}"}]
    for side, r in (("jax", jax), ("deepspeed", ds)):
        u = C.updates({param: r.params0[param]}, {param: init[param]})[param]
        out.append({"name": f"{tag}: update diagnosis, {side} update vs exact AdamW of the "
                            "float64 gradient", "value": C.rel_l2_error(u, exact),
                    "note": f"{param}; its gradient vs float64: "
                            f"{C.rel_l2_error(r.grads0[param], g64[param]):.3e}"})
    return out


# ----------------------------------------------------------------------------- environment


def versions() -> dict[str, str]:
    """Installed versions (from package metadata, nothing imported)."""
    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def hardware() -> dict[str, Any]:
    """CPU model, logical cores, memory, GPUs (by nvidia-smi when present)."""
    hw: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(),
                          "cpu_count": os.cpu_count()}
    try:
        hw["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                hw["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        hw["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            r = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            if r.returncode == 0 and r.stdout.strip():
                hw["gpus"] = "; ".join(r.stdout.strip().splitlines())
        except (OSError, subprocess.SubprocessError):
            pass
    return hw


# ----------------------------------------------------------------------------- main entry


@dataclass
class ParityOptions:
    """Everything ``parity run`` decides besides the config."""

    out: Path
    zero_stages: tuple[int, ...] = DEFAULT_ZERO_STAGES
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    steps_fp32: int = FP32_LOSS_STEPS
    steps_bf16: int = BF16_STEPS
    jax_devices: int | None = None  # CPU only; default: zero.world_size
    run_timeout_s: float | None = 1800.0
    forward: bool = True
    trainer_cmd: Callable[[str], list[str]] = default_trainer_cmd


def validate_options(opts: ParityOptions, cfg: ExperimentConfig) -> None:
    """ValueError naming the option for bad stages, precisions, steps or device counts."""
    if not opts.zero_stages:
        raise ValueError("--zero-stages: give at least one of 0, 1, 2, 3")
    for s in opts.zero_stages:
        if s not in (0, 1, 2, 3):
            raise ValueError(f"--zero-stages: {s} is not a ZeRO stage; allowed: 0, 1, 2, 3")
    if len(set(opts.zero_stages)) != len(opts.zero_stages):
        raise ValueError(f"--zero-stages: {list(opts.zero_stages)} repeats a stage")
    if not opts.precisions:
        raise ValueError("--precisions: give at least one of fp32, bf16")
    for p in opts.precisions:
        if p not in DEFAULT_PRECISIONS:
            raise ValueError(f"--precisions: {p!r}; allowed: fp32, bf16")
    for name in ("steps_fp32", "steps_bf16"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(opts, name)} must be >= 1")
    if opts.jax_devices is not None and opts.jax_devices < 1:
        raise ValueError(f"--jax-devices={opts.jax_devices} must be >= 1")


def run_parity(cfg: ExperimentConfig, opts: ParityOptions,
               config_source: str | None = None) -> dict[str, Any]:
    """Run every phase and return the result dict (see :mod:`parity.report`); the
    reports are written under ``opts.out``. Never raises for a failed trainer: the
    failure is recorded in ``errors`` and fails the run's checks."""
    from lmspec.data import Dataset

    validate_options(opts, cfg)
    cfg = force_parity_profile(cfg, log)
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    errors: list[str] = []
    on_gpu = gpu_available()
    jax_devices = None if on_gpu else (opts.jax_devices or cfg.zero.world_size)
    runs_plan = plan_runs(out, opts.zero_stages, opts.precisions, opts.steps_fp32,
                          opts.steps_bf16)
    n_phases = 4 + len(runs_plan)
    phase = 0

    def begin(what: str) -> float:
        nonlocal phase
        phase += 1
        log(f"phase {phase}/{n_phases}: {what}")
        return time.perf_counter()

    def end(t0: float, what: str = "done") -> None:
        log(f"  {what} in {time.perf_counter() - t0:.1f} s")

    # 1. data
    t0 = begin(f"data: token cache of {cfg.data.source!r} ({cfg.data.tokenizer})")
    ds = Dataset.from_config(cfg)
    end(t0, f"{ds.num_tokens} tokens, {ds.num_train_windows} training windows")

    # 2. weights
    t0 = begin(f"weights: init_weights(seed={cfg.train.seed})")
    init = init_weights(cfg.model, cfg.train.seed)
    init_path = save_safetensors(init, out / "init_weights.safetensors")
    config_path = out / "config.yaml"
    save_config(cfg, config_path)
    end(t0, f"{sum(v.size for v in init.values())} parameters -> {init_path.name}")

    # 3. forward
    fwd_stats: dict[str, dict[str, float]] = {}
    checks: list[C.Check] = []
    info: list[dict] = []
    t0 = begin("forward: jax vs torch vs Hugging Face logits on a validation batch")
    if opts.forward:
        try:
            rows = min(FORWARD_ROWS, cfg.train.global_batch_size)
            val = ds.val_batch(0, rows) if ds.num_val_windows else ds.global_batch(0)[:rows]
            logits = forward_logits(cfg, init, val[:, :-1], opts.precisions)
            fwd_stats, fchecks, finfo = forward_checks(logits)
            checks += fchecks
            info += finfo
            for c in fchecks:
                log(f"  {c.name}: {c.value:.3e} ({'pass' if c.passed else 'FAIL'})")
        except Exception as e:  # noqa: BLE001 - recorded, fails the run
            errors.append(f"forward comparison failed: {type(e).__name__}: {e}")
            log(f"  FAILED: {type(e).__name__}: {e}")
            if "fp32" in opts.precisions:
                for nice in ("torch", "Hugging Face"):
                    checks.append(_nan_check(f"fp32 forward: logits max abs diff, jax vs "
                                             f"{nice}", "fp32.logits_max_abs", str(e)))
        end(t0)
    else:
        end(t0, "skipped (--no-forward)")

    # 4. training runs
    runs: dict[str, RunData] = {}
    for spec in runs_plan:
        what = (f"train {spec.label} ({spec.steps} steps"
                + (f", {jax_devices} virtual CPU devices" if spec.side == "jax" and jax_devices
                   else "")
                + (f", world size {cfg.zero.world_size}" if spec.side == "torch" else "")
                + ")")
        t0 = begin(what)
        if spec.out_dir.exists():
            shutil.rmtree(spec.out_dir)
        cmd = opts.trainer_cmd(spec.side) + trainer_args(spec, config_path, init_path)
        env = jax_env(os.environ, jax_devices) if spec.side == "jax" else dict(os.environ)
        rc, secs, tail = run_trainer(cmd, env, spec.out_dir, spec.steps, spec.label,
                                     opts.run_timeout_s)
        if rc != 0:
            msg = (f"{spec.label}: trainer exited with status {rc} after {secs:.0f} s; "
                   f"log {spec.out_dir / 'train.log'}:\n{tail}")
            errors.append(msg)
            runs[spec.label] = RunData(spec, error=msg, seconds=secs)
            log(f"  FAILED (exit {rc}); last lines of the log:\n{tail}")
            continue
        try:
            data = read_run(spec)
            data.seconds = secs
            runs[spec.label] = data
            loss = data.series("loss")
            end(t0, f"loss {loss[0]:.4f} -> {loss[-1]:.4f}")
        except (OSError, ValueError, KeyError) as e:
            msg = f"{spec.label}: outputs unreadable: {type(e).__name__}: {e}"
            errors.append(msg)
            runs[spec.label] = RunData(spec, error=msg, seconds=secs)
            log(f"  FAILED: {msg}")

    # 5. checks and reports
    t0 = begin("checks and reports")
    tchecks, tinfo, pairs = training_checks(runs, init, opts.zero_stages, opts.precisions,
                                            cfg.optim)
    checks += tchecks
    info += tinfo
    failed_updates = [c for c in tchecks if c.key == "fp32.update_rel_err" and not c.passed
                      and math.isfinite(c.value)]
    if failed_updates:
        # diagnose against a float64 ground truth of the same step-0 gradient
        try:
            g64 = float64_gradient(cfg, init, ds.global_batch(0))
            for c in failed_updates:
                stage = c.detail["stage"]
                info += truth_diagnosis(f"fp32 zero{stage}", c.detail["param"],
                                        runs["jax fp32"], runs[run_label("torch", "fp32", stage)],
                                        init, cfg.optim, g64)
        except Exception as e:  # noqa: BLE001 - a diagnosis, not a check
            info.append({"name": "update diagnosis vs float64", "value": None,
                         "note": f"failed: {type(e).__name__}: {e}"})
    series = {}
    throughput = {}
    for label, r in runs.items():
        if r.error is not None:
            continue
        series[label] = {"side": r.spec.side, "precision": r.spec.precision,
                         "zero_stage": r.spec.zero_stage, "step": r.series("step"),
                         "loss": r.series("loss"), "grad_norm": r.series("grad_norm"),
                         "lr": r.series("lr"), "batch_fingerprint": r.series("batch_fingerprint"),
                         "tokens_per_s": r.series("tokens_per_s")}
        s = dict(r.summary or {})
        s.pop("versions", None)
        throughput[label] = {"side": r.spec.side, "wall_s": r.seconds, **s}
    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "config_source": config_source,
        "versions": versions(),
        "hardware": hardware(),
        "setup": {
            "zero stages": ", ".join(str(s) for s in opts.zero_stages),
            "precisions": ", ".join(opts.precisions),
            "steps": f"fp32 {opts.steps_fp32} (loss judged over the first "
                     f"{min(FP32_LOSS_STEPS, opts.steps_fp32)}), bf16 {opts.steps_bf16}; "
                     "DeepSpeed fp32 runs as long as bf16 when both are requested (bf16 floor)",
            "jax devices": ("all GPUs" if on_gpu else
                            f"{jax_devices} virtual CPU devices "
                            f"(XLA_FLAGS=--xla_force_host_platform_device_count={jax_devices}),"
                            f" mesh {cfg.mesh.resolve(jax_devices)}; the same count as the "
                            f"DeepSpeed world size so per-device figures compare like for like"),
            "deepspeed": f"world size {cfg.zero.world_size} "
                         f"({'NCCL' if on_gpu else 'gloo'} on {'GPU' if on_gpu else 'CPU'})",
            "global batch": f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens, "
                            f"micro batch {cfg.train.micro_batch_size}",
            "forward batch": f"{min(FORWARD_ROWS, cfg.train.global_batch_size)} validation "
                             f"windows of {cfg.data.seq_len} tokens, in process, JAX on one "
                             "device",
            "trainer overrides": "train.eval_every=0 (validation does not change training)",
            "weights": str(init_path),
            "wall time": f"{time.perf_counter() - t_start:.0f} s",
        },
        "forward": fwd_stats,
        "series": series,
        "pairs": pairs,
        "throughput": throughput,
        "checks": [c.to_dict() for c in checks],
        "info": info,
        "errors": errors,
        "runs": {label: {"out_dir": str(r.spec.out_dir), "seconds": r.seconds,
                         "error": r.error} for label, r in runs.items()},
    }
    from parity.report import write_reports

    paths = write_reports(result, out)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    end(t0)
    return result
