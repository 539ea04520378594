"""Typed experiment configuration shared by both trainers.

Frozen, keyword-only dataclasses loaded from YAML. A YAML file may extend another with
``base: other.yaml`` (resolved relative to the file); sections are merged key by key.
``dotted.key=value`` overrides are coerced to the field's type. Unknown keys, wrong
types and impossible values raise :class:`ConfigError` naming the key and what is
allowed. This module imports neither jax nor torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmspec.errors import UserError
from lmspec.nonfinite import POLICY_RE


class ConfigError(UserError):
    """A user mistake in a config file or override; the message names the key."""


# Logical axis name -> mesh axes. A value is a mesh axis name, a list of them, or null
# (replicated). Mesh axes are `data`, `fsdp` and `tensor`. Parameter axes (`embed`,
# `heads`, ...) and activation axes (`act_*`) are looked up in the same table, so
# switching FSDP to tensor parallelism is an edit of this table only.
DEFAULT_RULES: dict[str, Any] = {
    "act_batch": ["data", "fsdp"],
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "act_head_dim": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "layers": None,
}

MESH_AXES = ("data", "fsdp", "tensor")
PRECISIONS = ("fp32", "bf16")
# "auto": the trainer picks per model size and device memory (jaxlm.tuning.resolve_remat)
REMAT_POLICIES = ("auto", "none", "full", "dots_saveable")
WD_MASK_POLICIES = ("matrices", "all", "none")
# "auto": cudnn (flash) for bf16 on NVIDIA GPUs where cuDNN supports the shapes, xla
# elsewhere (jaxlm.tuning.resolve_attention)
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# DeepSpeed settings: "parity" is bitwise-strict (no comm/compute overlap, unfused AdamW,
# the parity runs' attention); "bench" is what users run for speed (see torchlm.ds_config)
ZERO_PROFILES = ("parity", "bench")
# Weights & Biases logging of the metrics records (lmspec.wandb_log): off, offline (files
# under train.out_dir/wandb, `wandb sync` later) or online
WANDB_MODES = ("off", "offline", "online")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder-only Llama shapes, with Hugging Face ``LlamaConfig`` key names."""

    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, prefix: str = "model") -> None:
        _finite_floats(self, prefix)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            _positive(f"{prefix}.{name}", getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{prefix}.hidden_size={self.hidden_size} must be divisible by "
                f"{prefix}.num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"{prefix}.hidden_size / {prefix}.num_attention_heads = {self.head_dim} "
                "must be even (rotary embeddings rotate pairs)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{prefix}.num_attention_heads={self.num_attention_heads} must be divisible "
                f"by {prefix}.num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_theta <= 0:
            raise ConfigError(f"{prefix}.rope_theta={self.rope_theta} must be > 0")
        if not 0 < self.rms_norm_eps < 1:
            raise ConfigError(f"{prefix}.rms_norm_eps={self.rms_norm_eps} must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from and how they are cut into windows.

    ``source``: ``stdlib`` (the running interpreter's standard library sources), a text
    file, a directory or glob of text files, a ``.jsonl`` file with a ``text`` field, or
    a pre-tokenized token file (its ``manifest.json`` or the ``.bin`` beside it). A
    ``text:``, ``glob:``, ``jsonl:`` or ``tokens:`` prefix forces the kind. Through the
    optional ``datasets`` package (extra ``hf``), never the hub: ``hf-disk:DIR`` (a
    folder written by ``save_to_disk``), ``hf-parquet:``, ``hf-json:`` or ``hf-text:``
    followed by a file or glob.
    ``text_field``: the field (``.jsonl``) or column (``hf-*``) holding the text.
    ``split``: the split of an ``hf-*`` source (``hf-disk:`` of a saved ``DatasetDict``;
    the file builders have only ``train``).
    ``tokenizer``: ``byte``, ``bpe:<vocab_size>``, a path to a ``tokenizer.json`` or a
    Hugging Face folder holding one.
    """

    source: str = "stdlib"
    tokenizer: str = "byte"
    seq_len: int = 128
    seed: int = 0
    cache_dir: str = ".cache/lmspec"
    val_fraction: float = 0.01
    max_bytes: int = 0  # 0 = the whole corpus; otherwise the first max_bytes of it
    text_field: str = "text"
    split: str = "train"

    def validate(self, prefix: str = "data") -> None:
        _finite_floats(self, prefix)
        _positive(f"{prefix}.seq_len", self.seq_len)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"{prefix}.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.max_bytes < 0:
            raise ConfigError(f"{prefix}.max_bytes={self.max_bytes} must be >= 0 (0 = all)")
        if not self.source:
            raise ConfigError(f"{prefix}.source must not be empty")
        for key in ("text_field", "split"):
            if not getattr(self, key).strip():
                raise ConfigError(f"{prefix}.{key} must not be empty (default "
                                  f"{getattr(DataConfig, key)!r})")
        tok = self.tokenizer
        if tok.startswith("bpe:"):
            try:
                size = int(tok[4:])
            except ValueError:
                raise ConfigError(
                    f"{prefix}.tokenizer={tok!r}: expected bpe:<vocab_size>, e.g. bpe:4096"
                ) from None
            if size < 260:
                raise ConfigError(f"{prefix}.tokenizer={tok!r}: BPE vocab_size must be >= 260")
        elif tok != "byte" and not tok.endswith(".json") and not Path(tok).is_dir():
            raise ConfigError(
                f"{prefix}.tokenizer={tok!r}: allowed are 'byte', 'bpe:<vocab_size>', a "
                "path to a tokenizer.json or a Hugging Face folder holding one"
            )


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (see :mod:`lmspec.schedule`)."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    decay_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping
    wd_mask: str = "matrices"  # matrices: decay tensors with ndim >= 2; all; none

    def validate(self, prefix: str = "optim") -> None:
        _finite_floats(self, prefix)
        if self.lr < 0:
            raise ConfigError(f"{prefix}.lr={self.lr} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{prefix}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps={self.warmup_steps} must be >= 0")
        if self.decay_steps < self.warmup_steps:
            raise ConfigError(
                f"{prefix}.decay_steps={self.decay_steps} must be >= "
                f"{prefix}.warmup_steps={self.warmup_steps}"
            )
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"{prefix}.{name}={v} must be in [0, 1)")
        if self.eps <= 0:
            raise ConfigError(f"{prefix}.eps={self.eps} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay={self.weight_decay} must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError(f"{prefix}.grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        _choice(f"{prefix}.wd_mask", self.wd_mask, WD_MASK_POLICIES)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Loop settings. ``micro_batch_size`` is sequences per data-parallel rank per
    micro-step (DeepSpeed's ``train_micro_batch_size_per_gpu``); accumulation steps
    follow from ``global_batch_size / (micro_batch_size * data_parallel_size)``."""

    steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 1
    precision: str = "fp32"
    seed: int = 0
    out_dir: str = "runs/default-{framework}"  # {framework}: jax or ds (lmspec.runs)
    log_every: int = 1
    eval_every: int = 0  # 0 = no periodic validation
    eval_batches: int = 2
    ckpt_every: int = 0  # 0 = checkpoint only at the end
    ckpt_keep: int = 2
    remat: str = "auto"  # auto | none | full | dots_saveable
    scan_layers: bool = True
    attention: str = "auto"  # auto | xla | cudnn (GPU only)
    warmup_steps_excluded: int = 2  # steps left out of throughput figures
    nan_policy: str = "stop"  # stop | skip:N (lmspec.nonfinite)

    def validate(self, prefix: str = "train") -> None:
        _positive(f"{prefix}.steps", self.steps)
        _positive(f"{prefix}.global_batch_size", self.global_batch_size)
        _positive(f"{prefix}.micro_batch_size", self.micro_batch_size)
        _positive(f"{prefix}.log_every", self.log_every)
        _positive(f"{prefix}.ckpt_keep", self.ckpt_keep)
        _positive(f"{prefix}.eval_batches", self.eval_batches)
        for name in ("eval_every", "ckpt_every", "warmup_steps_excluded"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be >= 0")
        _choice(f"{prefix}.precision", self.precision, PRECISIONS)
        _choice(f"{prefix}.remat", self.remat, REMAT_POLICIES)
        _choice(f"{prefix}.attention", self.attention, ATTENTION_IMPLS)
        if not self.out_dir:
            raise ConfigError(f"{prefix}.out_dir must not be empty")
        if not POLICY_RE.fullmatch(self.nan_policy):
            raise ConfigError(f"{prefix}.nan_policy={self.nan_policy!r}: allowed are 'stop' and "
                              "'skip:N' (N non-finite steps skipped before stopping)")


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """JAX device mesh sizes. One size may be -1: it takes the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    rules: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def __post_init__(self) -> None:
        # a config names only the rules it changes; the rest keep their defaults
        object.__setattr__(self, "rules", {**DEFAULT_RULES, **self.rules})

    def validate(self, prefix: str = "mesh") -> None:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        for a, n in sizes.items():
            if n == 0 or n < -1:
                raise ConfigError(f"{prefix}.{a}={n} must be a positive size or -1 (fill)")
        if sum(1 for n in sizes.values() if n == -1) > 1:
            raise ConfigError(f"{prefix}: at most one of data/fsdp/tensor may be -1")
        for name, value in self.rules.items():
            if name not in DEFAULT_RULES:
                raise ConfigError(
                    f"{prefix}.rules.{name}: unknown logical axis; allowed: {list(DEFAULT_RULES)}"
                )
            axes = [value] if isinstance(value, str) else (value or [])
            if not isinstance(axes, list) or any(a not in MESH_AXES for a in axes):
                raise ConfigError(
                    f"{prefix}.rules.{name}={value!r}: allowed are null, one of "
                    f"{list(MESH_AXES)} or a list of them"
                )

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for ``num_devices`` devices (fills a -1)."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        known = 1
        for n in sizes.values():
            if n != -1:
                known *= n
        for a, n in sizes.items():
            if n == -1:
                if num_devices % known:
                    raise ConfigError(
                        f"mesh: {num_devices} devices cannot be split with "
                        f"{ {k: v for k, v in sizes.items() if v != -1} }"
                    )
                sizes[a] = num_devices // known
        total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
        if total != num_devices:
            raise ConfigError(
                f"mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']}"
                f" = {total} but {num_devices} devices are available"
            )
        return sizes


@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    """DeepSpeed ZeRO stage, number of worker processes and settings profile
    (``parity``: bitwise-strict, the default; ``bench``: tuned for speed) of the torch side."""

    stage: int = 1
    world_size: int = 2
    profile: str = "parity"

    def validate(self, prefix: str = "zero") -> None:
        _choice(f"{prefix}.stage", self.stage, (0, 1, 2, 3))
        _positive(f"{prefix}.world_size", self.world_size)
        _choice(f"{prefix}.profile", self.profile, ZERO_PROFILES)


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Multi-process JAX. Empty/-1 values fall back to the environment variables
    ``JAXLM_COORDINATOR``, ``JAXLM_NUM_PROCESSES`` and ``JAXLM_PROCESS_ID``."""

    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = -1
    # a process whose heartbeat stops this long ends the job (jaxlm.distributed)
    heartbeat_timeout_s: float = 20.0

    def validate(self, prefix: str = "distributed") -> None:
        _positive(f"{prefix}.num_processes", self.num_processes)
        if not self.heartbeat_timeout_s > 0:
            raise ConfigError(f"{prefix}.heartbeat_timeout_s={self.heartbeat_timeout_s} "
                              "must be > 0 (seconds)")
        if self.process_id < -1 or (
            self.process_id >= 0 and self.process_id >= self.num_processes
        ):
            raise ConfigError(
                f"{prefix}.process_id={self.process_id} must be -1 (from env) or in "
                f"[0, {self.num_processes})"
            )


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """Optional loggers of the metrics records, besides ``metrics.jsonl`` and TensorBoard.

    ``wandb``: ``off`` (default), ``offline`` (a W&B run under ``train.out_dir/wandb``,
    uploaded later by ``wandb sync``) or ``online`` (needs ``wandb login`` or
    ``WANDB_API_KEY``); the ``wandb`` package comes with the ``wandb`` extra. Empty
    ``wandb_entity`` / ``wandb_group`` leave W&B's defaults; an empty ``wandb_name`` is the
    run folder's name (the last part of ``train.out_dir``).
    """

    wandb: str = "off"
    wandb_project: str = "jaxlm-parity"
    wandb_entity: str = ""
    wandb_name: str = ""
    wandb_group: str = ""

    def validate(self, prefix: str = "log") -> None:
        _choice(f"{prefix}.wandb", self.wandb, WANDB_MODES)
        if self.wandb != "off" and not self.wandb_project.strip():
            raise ConfigError(f"{prefix}.wandb_project must not be empty when "
                              f"{prefix}.wandb={self.wandb}")
        bad = sorted(set(self.wandb_project) & set("/\\#?%:"))
        if bad or len(self.wandb_project) > 128:  # what W&B refuses in a project name
            raise ConfigError(f"{prefix}.wandb_project={self.wandb_project!r}: at most 128 "
                              "characters, none of / \\ # ? % :")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> ExperimentConfig:
        if not self.name:
            raise ConfigError("name must not be empty")
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        self.mesh.validate()
        self.zero.validate()
        self.distributed.validate()
        self.log.validate()
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} must be <= "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        t = self.train
        ws = self.zero.world_size
        if t.global_batch_size % (t.micro_batch_size * ws):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} must be divisible by "
                f"train.micro_batch_size*zero.world_size={t.micro_batch_size}*{ws}"
            )
        if -1 not in (self.mesh.data, self.mesh.fsdp):
            dp = self.mesh.data * self.mesh.fsdp
            if t.global_batch_size % (t.micro_batch_size * dp):
                raise ConfigError(
                    f"train.global_batch_size={t.global_batch_size} must be divisible by "
                    f"train.micro_batch_size*mesh.data*mesh.fsdp="
                    f"{t.micro_batch_size}*{self.mesh.data}*{self.mesh.fsdp}"
                )
        return self

    def grad_accum_steps(self, data_parallel_size: int) -> int:
        """Micro-steps per optimizer step for a given data-parallel size."""
        per_micro = self.train.micro_batch_size * data_parallel_size
        if self.train.global_batch_size % per_micro:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} must be divisible "
                f"by train.micro_batch_size*data_parallel_size="
                f"{self.train.micro_batch_size}*{data_parallel_size}"
            )
        return self.train.global_batch_size // per_micro

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- helpers


def _finite_floats(section: Any, prefix: str) -> None:
    """A NaN or infinite float field is an error naming it: comparisons with NaN are all
    False, so range checks alone would let ``optim.lr=nan`` through to training."""
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{prefix}.{f.name}={v}: must be a finite number")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed are {list(allowed)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (YAML values) or convert (strings from overrides) ``value`` to ``tp``."""
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = prefix or "config"
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {full!r}; allowed keys here: {names}")
        tp = hints[key]
        if cls is LogConfig and key == "wandb" and value is False:
            value = "off"  # YAML reads a bare `wandb: off` as false
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# the keys of ExperimentConfig that are sections (dataclasses), e.g. "train"
_SECTIONS = tuple(k for k, tp in _hints(ExperimentConfig).items()
                  if dataclasses.is_dataclass(tp))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; name a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if data is None:
        # an empty file (or only comments) is almost always a mistake: training on the
        # defaults would look like success
        raise ConfigError(f"config file {path} is empty; it needs at least one setting "
                          "(write `{}` to take every default on purpose)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {data!r}")
    for key, value in data.items():
        if key in _SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping of its keys, got "
                              f"{value!r}")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, _read_yaml(path.parent / b, seen + (path,)))
    return _merge(merged, data)


def parse_override(text: str) -> tuple[list[str], str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), value


def _apply_override(data: dict, parts: list[str], value: str) -> None:
    """Set a raw override string into the nested dict; types are checked in _build."""
    cls: type = ExperimentConfig
    node = data
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if cls is dict:
            # inside a free mapping (mesh.rules): the value is YAML, e.g. [data, fsdp]
            node[part] = yaml.safe_load(value) if i == len(parts) - 1 else node.get(part, {})
            if i == len(parts) - 1:
                return
            node = node[part]
            continue
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            full = ".".join(parts)
            where = f"unknown key {dotted!r}" if dotted == full else (
                f"unknown key {full!r} ({dotted!r} does not exist)")
            raise ConfigError(f"override {full}=...: {where}; allowed keys here: {list(names)}")
        tp = _hints(cls)[part]
        last = i == len(parts) - 1
        if last:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{dotted!r} is a section; override one of its keys")
            if typing.get_origin(tp) is dict:
                parsed = yaml.safe_load(value)
                node[part] = parsed
            else:
                node[part] = value
            return
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif typing.get_origin(tp) is dict:
            cls = dict
        else:
            raise ConfigError(f"{dotted!r} is not a section; cannot set {'.'.join(parts)}")
        if part in node and not isinstance(node[part], dict):
            # e.g. `train: 5` in the YAML plus train.steps=1: replacing the section with
            # defaults would hide the mistake
            raise ConfigError(f"{dotted}: expected a mapping, got {node[part]!r}; cannot "
                              f"set {'.'.join(parts)}")
        if part not in node:
            if cls is dict:
                node[part] = dict(DEFAULT_RULES) if part == "rules" else {}
            else:
                node[part] = {}
        node = node[part]


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a plain dict."""
    data = dict(data)
    from_hf = None
    if isinstance(data.get("model"), dict) and "from_hf" in data["model"]:
        data["model"] = dict(data["model"])
        from_hf = str(data["model"].pop("from_hf"))
    for text in overrides:
        parts, value = parse_override(text)
        if parts == ["model", "from_hf"]:
            from_hf = value
            continue
        _apply_override(data, parts, value)
    if from_hf:
        # model.from_hf=DIR: the model section from a Hugging Face folder's config.json
        from lmspec.hf import model_values, read_config

        model = dict(data["model"]) if isinstance(data.get("model"), dict) else {}
        model.update(model_values(read_config(from_hf)))
        data["model"] = model
    cfg = _build(ExperimentConfig, data, "")
    return cfg.validate()


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()
                ) -> ExperimentConfig:
    """Load a YAML experiment (following ``base:``) and apply ``key=value`` overrides."""
    return from_dict(_read_yaml(Path(path)), overrides)


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically; :func:`load_config` reads it back."""
    from lmspec.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resume_mismatches(saved: dict[str, Any] | None, cfg: ExperimentConfig,
                      keys: tuple[str, ...]) -> list[str]:
    """``"key: checkpoint X, config Y"`` for each dotted key (or every key of a named
    section) where a run's saved config differs from ``cfg``; resuming across such a
    difference cannot work (the saved state has other shapes or another layout)."""
    if not saved:
        return []
    now = cfg.to_dict()
    out = []
    for key in keys:
        old_node: Any = saved
        new_node: Any = now
        for part in key.split("."):
            old_node = old_node.get(part) if isinstance(old_node, dict) else None
            new_node = new_node.get(part) if isinstance(new_node, dict) else None
        if isinstance(new_node, dict):
            pairs = [(f"{key}.{k}", (old_node or {}).get(k, v), v) for k, v in new_node.items()]
        else:
            pairs = [(key, new_node if old_node is None else old_node, new_node)]
        out += [f"{k}: checkpoint {o!r}, config {n!r}" for k, o, n in pairs if o != n]
    return out


def check_resumable(saved: dict[str, Any] | None, cfg: ExperimentConfig,
                    keys: tuple[str, ...], where: str | os.PathLike) -> None:
    """Raise :class:`ConfigError` naming every key of :func:`resume_mismatches`, so a run
    refuses to resume state it cannot load, before it writes anything."""
    diffs = resume_mismatches(saved, cfg, keys)
    if diffs:
        raise ConfigError(
            f"cannot resume from {where}: it was written with a different config ("
            + "; ".join(diffs) + "); pass --no-resume to start over or choose another "
            "train.out_dir"
        )
