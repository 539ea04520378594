"""``parity translate ds_config.json [--world-size N]``: a user's DeepSpeed JSON as our
config, with the precision traps it holds.

Reads the DeepSpeed keys that decide the math (batch sizes and accumulation, clipping,
ZeRO stage, bf16/fp16, ``data_types.grad_accum_dtype``, ``communication_data_type``, the
optimizer and scheduler sections) and prints YAML that both ``jaxlm train`` and ``torchlm
train`` read (the ``train``, ``optim`` and ``zero`` sections: put them over a model and data
config), then every trap: a setting that makes DeepSpeed compute something our trainers do
not (or that a parity check would flag), what it does, and the fix. Keys it does not map
are listed, never dropped silently: DeepSpeed-only settings (logging, communication
tuning) separately from keys it does not know at all.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmspec.errors import UserError

# keys whose effect is speed, memory or logging only: listed, no config change
DS_ONLY = {
    "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer",
    "dump_state", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger",
    "flops_profiler", "memory_breakdown", "aio", "activation_checkpointing",
    "checkpoint", "autotuning", "elasticity", "compression_training",
    "data_efficiency", "timers", "disable_allgather", "sparse_gradients",
    "seed",  # not a DeepSpeed key; our seed is train.seed
}
ZERO_DS_ONLY = {
    "contiguous_gradients", "overlap_comm", "reduce_scatter", "reduce_bucket_size",
    "allgather_partitions", "allgather_bucket_size", "round_robin_gradients",
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save", "sub_group_size", "load_from_fp32_weights",
    "elastic_checkpoint", "ignore_unused_parameters", "legacy_stage1", "zero_hpz_partition_size",
    "zero_quantized_weights", "zero_quantized_gradients", "mics_shard_size",
    "memory_efficient_linear", "use_multi_rank_bucket_allreduce", "log_trace_cache_warnings",
    "offload_optimizer", "offload_param", "stage3_module_granularity_threshold",
}
MAPPED_TOP = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "zero_optimization", "bf16", "fp16", "data_types",
    "communication_data_type", "optimizer", "scheduler", "amp", "fp32_allreduce",
    "prescale_gradients", "gradient_predivide_factor",
}


@dataclass
class Translation:
    """The config sections, the traps (what, effect, fix) and the unmapped keys."""

    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    traps: list[tuple[str, str, str]] = field(default_factory=list)
    ds_only: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def trap(self, what: str, effect: str, fix: str) -> None:
        self.traps.append((what, effect, fix))


def _num(conf: dict, key: str, where: str) -> float | None:
    v = conf.get(key)
    if v is None or v == "auto":
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{where}{key}={v!r}: expected a finite number")
    return v


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled"))


def translate(ds: dict[str, Any], world_size: int | None = None) -> Translation:
    """The :class:`Translation` of a DeepSpeed config dict."""
    if not isinstance(ds, dict):
        raise UserError("the DeepSpeed config must be a JSON object")
    t = Translation()
    train: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    zero: dict[str, Any] = {"profile": "parity"}
    _batches(ds, world_size, train, zero, t)
    clip = _num(ds, "gradient_clipping", "")
    if clip is not None:
        optim["grad_clip"] = float(clip)
    _precision(ds, train, zero, t)
    _optimizer(ds.get("optimizer"), optim, t)
    _scheduler(ds.get("scheduler"), optim, t)
    for key in ("prescale_gradients", "fp32_allreduce"):
        if ds.get(key):
            t.trap(f"{key}: true", "changes where gradients are scaled or in what dtype they "
                   "are reduced: rounding differs from an fp32 sum scaled once",
                   f"remove {key} for a parity run")
    pre = _num(ds, "gradient_predivide_factor", "")
    if pre not in (None, 1, 1.0):
        t.trap(f"gradient_predivide_factor: {pre}", "gradients are divided before and after "
               "the all-reduce: a different rounding of the same mean", "set it to 1.0")
    for key in sorted(ds):
        if key in MAPPED_TOP:
            continue
        (t.ds_only if key in DS_ONLY else t.unknown).append(key)
    t.config = {"train": train, "optim": optim, "zero": zero}
    return t


def _batches(ds: dict, world_size: int | None, train: dict, zero: dict,
             t: Translation) -> None:
    tbs = _num(ds, "train_batch_size", "")
    mbs = _num(ds, "train_micro_batch_size_per_gpu", "")
    gas = _num(ds, "gradient_accumulation_steps", "")
    ws = world_size
    known = [x for x in (tbs, mbs, gas) if x is not None]
    if len(known) == 3:
        if ws is None:
            if tbs % (mbs * gas):
                raise UserError(f"train_batch_size={tbs} is not train_micro_batch_size_per_gpu"
                                f"={mbs} x gradient_accumulation_steps={gas} x a world size")
            ws = int(tbs // (mbs * gas))
        elif tbs != mbs * gas * ws:
            raise UserError(f"train_batch_size={tbs} != {mbs} x {gas} x world size {ws}")
    else:
        if ws is None:  # DeepSpeed takes it from the launcher
            ws = 1
            t.trap("world size unknown", "the config alone does not say how many processes "
                   "share the batch; 1 was assumed", "pass --world-size N")
        if tbs is None:
            if mbs is None or gas is None:
                raise UserError("need train_batch_size, or train_micro_batch_size_per_gpu "
                                "and gradient_accumulation_steps, to fix the batch")
            tbs = mbs * gas * ws
        elif mbs is None:
            gas = gas or 1
            if tbs % (gas * ws):
                raise UserError(f"train_batch_size={tbs} is not a multiple of "
                                f"gradient_accumulation_steps={gas} x world size {ws}")
            mbs = tbs // (gas * ws)
        elif tbs % (mbs * ws):
            raise UserError(f"train_batch_size={tbs} is not a multiple of "
                            f"train_micro_batch_size_per_gpu={mbs} x world size {ws}")
    train["global_batch_size"] = int(tbs)
    train["micro_batch_size"] = int(mbs)
    zero["world_size"] = int(ws)


def _precision(ds: dict, train: dict, zero: dict, t: Translation) -> None:
    z = ds.get("zero_optimization") or {}
    if not isinstance(z, dict):
        raise UserError("zero_optimization must be an object")
    stage = int(z.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise UserError(f"zero_optimization.stage={stage}: expected 0-3")
    zero["stage"] = stage
    for key in sorted(z):
        if key == "stage":
            continue
        if key in ZERO_DS_ONLY:
            t.ds_only.append(f"zero_optimization.{key}")
        else:
            t.unknown.append(f"zero_optimization.{key}")
    if z.get("overlap_comm"):
        t.trap("zero_optimization.overlap_comm: true", "reduction order can change from run "
               "to run: DeepSpeed is not bitwise repeatable with itself",
               "our parity profile runs it off (zero.profile=parity); keep it for speed runs")
    for off in ("offload_optimizer", "offload_param"):
        dev = (z.get(off) or {}).get("device") if isinstance(z.get(off), dict) else None
        if dev not in (None, "none"):
            t.trap(f"zero_optimization.{off}.device: {dev}", "DeepSpeedCPUAdam updates on the "
                   "CPU with its own kernels (fp32, a different summation order)",
                   "parity-check without offload; offload changes memory, not the math")
    bf16, fp16 = _enabled(ds.get("bf16")), _enabled(ds.get("fp16")) or _enabled(ds.get("amp"))
    train["precision"] = "bf16" if (bf16 or fp16) else "fp32"
    if fp16:
        t.trap("fp16.enabled: true", "fp16 with dynamic loss scaling: DeepSpeed skips steps "
               "whose gradients overflow and rescales; our trainers have no fp16 (and no loss "
               "scale to mirror)", "train in bf16 (bf16.enabled: true, fp16 off) and compare "
               "with train.precision=bf16; train.nan_policy=skip:N mirrors bounded skipping")
    if bf16 or fp16:
        acc = (ds.get("data_types") or {}).get("grad_accum_dtype")
        if acc not in ("fp32", "float32", "torch.float32"):
            t.trap(f"data_types.grad_accum_dtype: {acc or 'unset (bf16)'}",
                   "each micro-batch's gradient is summed into a bf16 accumulator: rounding "
                   "grows with the number of micro-steps (the accumulation probe flags it)",
                   'set "data_types": {"grad_accum_dtype": "fp32"} (needs ZeRO >= 1)')
        comm = ds.get("communication_data_type")
        if comm not in ("fp32", "float32", "torch.float32"):
            t.trap(f"communication_data_type: {comm or 'unset (the model dtype)'}",
                   "gradients are all-reduced / reduce-scattered in bf16: the mean over "
                   "ranks is rounded to bf16", 'set "communication_data_type": "fp32"')
        if stage == 0:
            t.trap("ZeRO stage 0 with bf16", "DeepSpeed 0.19 refuses fp32 gradient "
                   "accumulation at stage 0, so bf16 gradients are accumulated in bf16",
                   "use ZeRO stage >= 1 for a bf16 parity run")
    for key in ("bf16", "fp16"):
        sec = ds.get(key)
        if isinstance(sec, dict):
            for k in sorted(set(sec) - {"enabled"}):
                (t.ds_only if key == "fp16" else t.unknown).append(f"{key}.{k}")
    for k in sorted(set(ds.get("data_types") or {}) - {"grad_accum_dtype"}):
        t.unknown.append(f"data_types.{k}")


def _optimizer(opt: Any, optim: dict, t: Translation) -> None:
    if opt is None:
        t.trap("no optimizer section", "the optimizer is built in your training script: this "
               "tool cannot see it", "check it is AdamW and set optim.* by hand")
        return
    if not isinstance(opt, dict):
        raise UserError("optimizer must be an object")
    kind = str(opt.get("type", "")).lower()
    params = opt.get("params") or {}
    if kind in ("adam", "adamw", "fusedadam", "cpuadam"):
        # DeepSpeed's Adam decouples weight decay (AdamW) unless adam_w_mode is false
        if kind != "adamw" and params.get("adam_w_mode") is False:
            t.trap("optimizer Adam with adam_w_mode: false", "weight decay is an L2 term added "
                   "to the gradient (torch.optim.Adam), not AdamW's decoupled decay",
                   "use AdamW (adam_w_mode: true) to compare with our AdamW")
    else:
        t.trap(f"optimizer type {opt.get('type')!r}", "our trainers run AdamW only",
               "compare an AdamW run, or port the optimizer first")
    for key, ours in (("lr", "lr"), ("eps", "eps"), ("weight_decay", "weight_decay")):
        v = _num(params, key, "optimizer.params.")
        if v is not None:
            optim[ours] = float(v)
    betas = params.get("betas")
    if isinstance(betas, (list, tuple)) and len(betas) == 2:
        optim["beta1"], optim["beta2"] = float(betas[0]), float(betas[1])
    for k in sorted(set(params) - {"lr", "eps", "weight_decay", "betas", "adam_w_mode",
                                   "torch_adam", "bias_correction", "amsgrad"}):
        t.unknown.append(f"optimizer.params.{k}")
    if params.get("amsgrad"):
        t.trap("optimizer amsgrad: true", "AMSGrad keeps the max of second moments",
               "turn amsgrad off (ours is plain AdamW)")
    if params.get("bias_correction") is False:
        t.trap("optimizer bias_correction: false", "no bias correction: the first steps are "
               "much smaller than AdamW's", "turn bias correction on")
    if optim.get("weight_decay"):
        optim["wd_mask"] = "matrices"
        t.trap("weight decay on which tensors", "DeepSpeed decays the tensors of the param "
               "groups your script passes; the config above decays matrices only (norm "
               "gains and no biases undecayed, optim.wd_mask=matrices)",
               "set optim.wd_mask to all, matrices or none to match your param groups")


# the schedulers mirrored: (key of the peak lr, key of the last decay step, key of a
# warm-up start above 0), None where the scheduler has no such key
_SCHEDULES = {"WarmupLR": ("warmup_max_lr", None, "warmup_min_lr"),
              "WarmupCosineLR": (None, "total_num_steps", "warmup_min_ratio"),
              "WarmupDecayLR": ("warmup_max_lr", "total_num_steps", None)}


def _scheduler(sch: Any, optim: dict, t: Translation) -> None:
    if sch is None:
        t.trap("no scheduler section", "the learning-rate schedule is built in your training "
               "script (or the rate is constant): this tool cannot see it", "set "
               "optim.warmup_steps, optim.decay_steps and optim.min_lr_ratio by hand "
               "(min_lr_ratio 1.0: constant after warm-up)")
        return
    if not isinstance(sch, dict):
        raise UserError("scheduler must be an object")
    kind = sch.get("type")
    p = sch.get("params") or {}
    warm = _num(p, "warmup_num_steps", "scheduler.params.")
    if warm is not None:
        optim["warmup_steps"] = int(warm)
    if p.get("warmup_type", "log") != "linear" and kind in ("WarmupLR", "WarmupDecayLR",
                                                            "WarmupCosineLR"):
        t.trap(f"scheduler warmup_type: {p.get('warmup_type', 'log (the default)')}",
               "a logarithmic warm-up; ours rises linearly", 'set "warmup_type": "linear"')
    if kind in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
        t.trap(f"{kind}: warm-up starts at step 0 from warmup_min_lr",
               "ours gives lr * (step + 1) / warmup_steps from step 0: the warm-up steps "
               "differ by one step's share of the rate (the loss-curve check sees it)",
               "expect it in the first warmup_num_steps steps, or compare after warm-up")
    if kind in _SCHEDULES:
        peak_key, total_key, start_key = _SCHEDULES[kind]
        peak = _num(p, peak_key, "scheduler.params.") if peak_key else None
        if peak is not None:
            optim["lr"] = float(peak)
        total = _num(p, total_key, "scheduler.params.") if total_key else None
        if total is not None:
            optim["decay_steps"] = int(total)
        if start_key and _num(p, start_key, "scheduler.params.") not in (None, 0, 0.0):
            t.trap(f"{start_key} > 0", "the warm-up starts above 0; ours starts at 0",
                   f"set {start_key}: 0")
    if kind == "WarmupLR":  # constant after the warm-up
        optim["min_lr_ratio"] = 1.0
        optim["decay_steps"] = int(optim.get("warmup_steps", 0)) + 1
    elif kind == "WarmupCosineLR":
        optim["min_lr_ratio"] = float(p.get("cos_min_ratio", 0.0001))
    elif kind == "WarmupDecayLR":
        optim["min_lr_ratio"] = 0.0
        t.trap("scheduler WarmupDecayLR", "a linear decay to 0; ours decays along a cosine",
               "use WarmupCosineLR (cos_min_ratio) to compare, or accept curve differences")
    else:
        t.trap(f"scheduler type {kind!r}", "not a warm-up + cosine schedule: not mirrored",
               "use WarmupCosineLR for a parity run")
    known = {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
             "total_num_steps", "warmup_min_ratio", "cos_min_ratio", "last_batch_iteration"}
    for k in sorted(set(p) - known):
        t.unknown.append(f"scheduler.params.{k}")


def render(t: Translation, source: str, base: str | None = None) -> str:
    """YAML (the config sections) followed by the traps and unmapped keys as comments."""
    lines = [f"# from {source} by `parity translate`: train/optim/zero sections for both",
             "# `jaxlm train` and `torchlm train`. Put them over a model and data config:",
             "# uncomment `base:` (a path relative to this file) or paste the sections."]
    if base:
        lines[-1] = "# (over the --base config named below)"
        lines.append(f"base: {base}")
    else:
        lines.append("# base: configs/tiny.yaml")
    body = yaml.safe_dump(t.config, sort_keys=False)
    lines.append(body.rstrip("\n"))
    lines.append("")
    lines.append(f"# precision traps ({len(t.traps)}):" if t.traps else "# precision traps: none")
    for what, effect, fix in t.traps:
        lines.append(f"# - {what}: {effect}. Fix: {fix}.")
    if t.ds_only:
        lines.append("# DeepSpeed-only settings (speed, memory, logging; no change to the "
                     "math), not carried over:")
        lines += [f"#   {k}" for k in t.ds_only]
    if t.unknown:
        lines.append("# keys this tool does not know (check them by hand):")
        lines += [f"#   {k}" for k in t.unknown]
    return "\n".join(lines) + "\n"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``parity translate`` on the ``parity`` command line."""
    p = subparsers.add_parser(
        "translate", help="turn a DeepSpeed config JSON into our config, listing its "
        "precision traps",
        description="Read a DeepSpeed ds_config.json and print the train/optim/zero config "
        "sections both jaxlm and torchlm read, then every setting that makes DeepSpeed "
        "compute something else (a precision trap: what it does, the fix) and every key "
        "not carried over.")
    p.add_argument("ds_config", type=Path, help="a DeepSpeed config JSON file")
    p.add_argument("--base", default=None, metavar="CONFIG",
                   help="write `base: CONFIG` first (a model and data config to complete "
                   "the sections; a path as the YAML's reader will see it)")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="processes the batch is split over (default: derived from "
                   "train_batch_size / (micro batch x accumulation))")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from lmspec.io import read_json

    path = args.ds_config
    ds = read_json(path, "DeepSpeed config JSON")
    if args.world_size is not None and args.world_size < 1:
        raise UserError(f"--world-size={args.world_size} must be >= 1")
    print(render(translate(ds, args.world_size), str(path), args.base), end="")
    return 0
