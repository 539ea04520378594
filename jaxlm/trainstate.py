"""A jaxlm checkpoint <-> the framework-neutral :class:`lmspec.trainstate.TrainState`.

The checkpoint is the one ``jaxlm train`` writes and restores (:mod:`jaxlm.checkpoint`):
``{"params", "opt", "step"}`` plus the meta record. The optimizer state is the optax
chain of :func:`jaxlm.step.make_optimizer`, walked leaf by leaf: ``ScaleByAdamState``'s
``mu`` / ``nu`` (the moments, laid out like the params, so :mod:`jaxlm.weights` maps them
to Hugging Face names as it maps the params) and ``count`` (the Adam bias-correction
count), and ``ScaleByScheduleState.count`` (the LR-schedule position); states without
arrays (clipping, the decay mask) carry nothing. A leaf of any other kind is an error
(:func:`map_opt_state`), so a change to the optimizer cannot be converted half-way.

Both directions work on one CPU device whatever mesh the run uses: Orbax restores a
checkpoint into any sharding, so the written checkpoint resumes on the config's mesh.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm import sharding as shd
from jaxlm.checkpoint import Checkpoints
from jaxlm.trainer import Setup, build_setup, checkpoint_meta
from jaxlm.weights import hf_names_of_paths, hf_to_params, params_to_hf
from lmspec.config import ExperimentConfig, from_dict, resume_mismatches
from lmspec.errors import UserError
from lmspec.trainstate import TrainState

# (optax state type, field) -> what the leaf holds
ADAM, SCHEDULE = "ScaleByAdamState", "ScaleByScheduleState"
LEAF_KINDS = {(ADAM, "mu"): "exp_avg", (ADAM, "nu"): "exp_avg_sq",
              (ADAM, "count"): "adam_step", (SCHEDULE, "count"): "schedule_step"}


def _cpu_device() -> jax.Device:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # a JAX without the CPU backend
        return jax.devices()[0]


def one_device_setup(cfg: ExperimentConfig) -> Setup:
    """The setup of ``cfg``'s model and optimizer on one CPU device: the state's tree,
    shapes and dtypes are those of any mesh (only the shardings differ)."""
    one = from_dict(cfg.to_dict(), [
        "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "zero.world_size=1",
        f"train.micro_batch_size={cfg.train.global_batch_size}", "train.attention=xla",
        "train.remat=none"])
    return build_setup(one, [_cpu_device()])


def check_mesh(cfg: ExperimentConfig) -> None:
    """A ConfigError naming the parameter when a mesh axis given as a number does not
    divide the dimension it shards (a ``-1`` axis is sized by the devices at train time,
    and checked then)."""
    from flax import nnx

    from jaxlm.trainer import _new_model

    sizes = {a: getattr(cfg.mesh, a) for a in ("data", "fsdp", "tensor")}
    sizes = {a: max(1, n) for a, n in sizes.items()}
    one = one_device_setup(cfg)
    abstract = nnx.eval_shape(lambda: _new_model(one.cfg, 0))
    shd.param_partition_specs(nnx.split(abstract)[1], cfg.mesh.rules, sizes)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def dotted(path: tuple) -> str:
    """A pytree path as Orbax names the leaf (``opt.1.0.mu.embed_vd``)."""
    return ".".join(_key_name(k) for k in path)


def _is_state(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def map_opt_state(opt: Any, fn: Callable[[str, tuple, Any], Any]) -> Any:
    """``opt`` with every leaf replaced by ``fn(kind, sub_path, leaf)``: ``kind`` from
    :data:`LEAF_KINDS` by the optax state type and field holding the leaf, ``sub_path``
    the leaf's keys inside that field (the param path for ``mu`` / ``nu``). A leaf of
    another kind is an error naming it."""

    def node(path: tuple, x: Any) -> Any:
        if not _is_state(x):
            raise RuntimeError(f"optimizer state leaf opt.{dotted(path)} is outside the "
                               "optax states this converter knows")
        changes = {}
        for name in x._fields:
            value = getattr(x, name)
            if not jax.tree_util.tree_leaves(value):
                continue  # EmptyState, MaskedState of an EmptyState
            kind = LEAF_KINDS.get((type(x).__name__, name))
            if kind is None:
                raise RuntimeError(
                    f"optimizer state opt.{dotted(path)}.{name} ({type(x).__name__}) is of "
                    "a kind this converter does not know (jaxlm.step.make_optimizer "
                    "changed?)")
            changes[name] = jax.tree_util.tree_map_with_path(
                lambda p, leaf, kind=kind: fn(kind, tuple(_key_name(k) for k in p), leaf),
                value)
        return x._replace(**changes) if changes else x

    return jax.tree_util.tree_map_with_path(node, opt, is_leaf=_is_state)


def _get(tree: Any, keys: tuple) -> Any:
    for k in keys:
        if isinstance(tree, dict) and k not in tree and str(k).isdigit():
            k = int(k)
        tree = tree[k]
    return tree


def _hf_label(cfg: ExperimentConfig, name: str) -> str:
    """``params.layers.attn.q_dhq`` -> that plus the HF name it holds, for messages."""
    parts = name.split(".")
    if "mu" in parts or "nu" in parts:
        parts = parts[parts.index("mu" if "mu" in parts else "nu") + 1:]
    elif parts[0] == "params":
        parts = parts[1:]
    else:
        return name
    names = {".".join(str(p) for p in path): hf
             for path, hf in hf_names_of_paths(cfg.model, cfg.train.scan_layers).items()}
    hf = names.get(".".join(parts))
    if hf is None:
        return name
    if cfg.train.scan_layers and hf.startswith("model.layers.0."):
        hf = "model.layers.*." + hf.removeprefix("model.layers.0.")
    return f"{name} ({hf})"


def check_checkpoint_tensors(ckpts: Checkpoints, step: int, setup: Setup,
                             cfg: ExperimentConfig, where: str) -> None:
    """Every array of checkpoint ``step`` (Orbax's metadata: nothing is read) against the
    state ``cfg`` restores: a UserError naming the missing, unexpected and mismatched
    ones (shape or dtype)."""
    import orbax.checkpoint as ocp
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # "no _CHECKPOINT_METADATA": expected
    try:
        meta = ocp.StandardCheckpointer().metadata(ckpts.step_dir(step) / "state")
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a bad folder
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{where}: its state metadata cannot be read ({first})") from e
    finally:
        absl_logging.set_verbosity(verbosity)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    have = {dotted(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want = {dotted(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(setup.abstract_state)[0]}
    problems = []
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        problems.append("missing " + ", ".join(_hf_label(cfg, n) for n in missing))
    if extra:
        problems.append("unexpected " + ", ".join(_hf_label(cfg, n) for n in extra))
    for n in sorted(set(want) & set(have)):
        w, h = want[n], have[n]
        hs, hd = tuple(getattr(h, "shape", ()) or ()), np.dtype(getattr(h, "dtype", None))
        if hs != tuple(w.shape) or hd != np.dtype(w.dtype):
            problems.append(f"{_hf_label(cfg, n)}: checkpoint {hs} {hd.name}, config "
                            f"{tuple(w.shape)} {np.dtype(w.dtype).name}")
    if problems:
        raise UserError(f"{where}: the checkpoint's arrays do not fit the model and "
                        "optimizer of its config.yaml: " + "; ".join(problems))


def read_state(run_dir: str | os.PathLike, step: int | None = None,
               say: Callable[[str], None] | None = None) -> TrainState:
    """The train state of checkpoint ``step`` (default: the newest complete one) of the
    jaxlm run in ``run_dir``, with the run's ``config.yaml``. Verified (checksums), then
    checked array by array before it is restored; ``records`` and ``source`` are left
    for the caller."""
    from lmspec.config import load_config

    say = say or (lambda _: None)
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ckpts = Checkpoints(run_dir, keep=1, read_only=True)
    try:
        steps = ckpts.all_steps()
        if not steps:
            raise UserError(f"{run_dir}: no complete jaxlm checkpoint in {ckpts.directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise UserError(f"{run_dir}: no complete checkpoint for step {step} in "
                            f"{ckpts.directory} (there are {steps})")
        where = str(ckpts.step_dir(step))
        todo = f"choose another checkpoint with --step (there are {steps})"
        if not ckpts.verify(step, todo):
            say(f"warning: {where} has no checksums.json (older version): not verified")
        meta = ckpts.read_meta(step, todo)
        diffs = resume_mismatches(meta.get("config"), cfg, ("model", "train.scan_layers"))
        if diffs:
            raise UserError(f"{where}: written with another model than {run_dir}/config.yaml "
                            "describes (" + "; ".join(diffs) + ")")
        setup = one_device_setup(cfg)
        check_checkpoint_tensors(ckpts, step, setup, cfg, where)
        restored, meta = ckpts.restore(step, setup.abstract_state)
    finally:
        ckpts.close()
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), restored)
    del restored
    if int(host["step"]) != int(meta["step"]):
        raise UserError(f"{where}: its state says step {int(host['step'])}, its record "
                        f"step {meta['step']}")
    scan = cfg.train.scan_layers
    moments: dict[str, dict] = {"exp_avg": {}, "exp_avg_sq": {}}
    counts: dict[str, int] = {}

    def collect(kind: str, sub: tuple, leaf: np.ndarray) -> None:
        if kind in moments:
            _set(moments[kind], sub, leaf)
        else:
            counts[kind] = int(leaf)

    map_opt_state(host["opt"], collect)
    return TrainState(
        config=cfg, params=params_to_hf(host["params"], cfg.model, scan),
        exp_avg=params_to_hf(moments["exp_avg"], cfg.model, scan),
        exp_avg_sq=params_to_hf(moments["exp_avg_sq"], cfg.model, scan),
        adam_step=counts["adam_step"], schedule_step=counts["schedule_step"],
        next_step=int(meta["step"]), source={"checkpoint": where, "step": step})


def _set(tree: dict, keys: tuple, value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(_int_key(k), {})
    tree[_int_key(keys[-1])] = value


def _int_key(k: Any) -> Any:
    return int(k) if isinstance(k, str) and k.isdigit() else k


def write_checkpoint(state: TrainState, out_dir: str | os.PathLike) -> Path:
    """Write ``state`` as checkpoint ``state.next_step`` of a jaxlm run in ``out_dir``
    (``state.config`` is the run's config), the way ``jaxlm train`` saves: the same
    tree, leaf types and meta record, checksums last. Returns the step folder."""
    cfg = state.config
    setup = one_device_setup(cfg)
    scan = cfg.train.scan_layers
    where = "the converted state"
    trees = {kind: hf_to_params(state.tensors(kind), cfg.model, scan, f"{where} ({kind})")
             for kind in ("params", "exp_avg", "exp_avg_sq")}
    counts = {"adam_step": state.adam_step, "schedule_step": state.schedule_step}

    def opt_leaf(kind: str, sub: tuple, abstract: jax.ShapeDtypeStruct) -> jax.Array:
        if kind in counts:
            value = np.asarray(counts[kind], dtype=abstract.dtype)
        else:
            value = np.asarray(_get(trees[kind], sub))
        return _place(value, abstract, f"{kind} {'.'.join(sub)}")

    abstract = setup.abstract_state
    tree = {
        "params": jax.tree_util.tree_map_with_path(
            lambda p, a: _place(np.asarray(_get(trees["params"], tuple(
                _key_name(k) for k in p))), a, f"params.{dotted(p)}"),
            abstract["params"]),
        "opt": map_opt_state(abstract["opt"], opt_leaf),
        "step": _place(np.asarray(state.next_step, np.int32), abstract["step"], "step"),
    }
    ckpts = Checkpoints(out_dir, keep=cfg.train.ckpt_keep, asynchronous=False)
    try:
        ckpts.save(state.next_step, tree, checkpoint_meta(cfg, state.next_step))
    finally:
        ckpts.close()
    return ckpts.step_dir(state.next_step)


def _place(value: np.ndarray, abstract: jax.ShapeDtypeStruct, name: str) -> jax.Array:
    """``value`` on the abstract leaf's device, its shape and dtype checked exactly."""
    if value.shape != tuple(abstract.shape) or value.dtype != np.dtype(abstract.dtype):
        raise AssertionError(f"{name}: {value.shape} {value.dtype}, the state holds "
                             f"{tuple(abstract.shape)} {np.dtype(abstract.dtype)}")
    return jax.device_put(value, abstract.sharding)
