"""The training loop: mesh, sharded state, jitted step, data, metrics, checkpoints.

Shape legend: M micro-batches per optimizer step, B rows per micro-batch (the
data-parallel batch: ``train.micro_batch_size * mesh.data * mesh.fsdp``), T sequence
length, G = M * B the global batch.

State ``{"params", "opt", "step"}`` is created directly sharded (the init is jitted
with ``out_shardings``), and ``train_step`` is compiled ahead of time with explicit in
and out shardings and the state donated. Each process builds only the rows of the
global batch its devices hold (``jax.make_array_from_callback``).
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxlm import sharding as shd
from jaxlm.api import matmul_precision
from jaxlm.checkpoint import Checkpoints, rng_key_data
from jaxlm.model import Llama, compute_dtype
from jaxlm.step import make_eval_step, make_optimizer, make_train_step
from jaxlm.weights import hf_to_params, params_to_hf
from lmspec import flops
from lmspec import weights as lw
from lmspec.config import ConfigError, ExperimentConfig, check_resumable, save_config
from lmspec.data import Dataset, fingerprint
from lmspec.io import atomic_write_json
from lmspec.metrics import MetricsWriter

BATCH_NAMES = (None, "act_batch", None)  # (M, B, T+1)


@dataclass
class Setup:
    """Everything static about a run on a given mesh."""

    cfg: ExperimentConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    lr_table: np.ndarray
    num_micro: int
    rows_per_micro: int
    param_shardings: dict
    state_shardings: dict
    abstract_state: dict
    batch_sharding: NamedSharding
    param_specs: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.cfg.data.seq_len

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        return (self.num_micro, self.rows_per_micro, self.seq_len + 1)


def _new_model(cfg: ExperimentConfig, seed: int) -> Llama:
    t = cfg.train
    return Llama(cfg.model, rngs=nnx.Rngs(params=seed), dtype=compute_dtype(t.precision),
                 scan_layers=t.scan_layers, remat=t.remat, attention=t.attention)


def build_setup(cfg: ExperimentConfig, devices: list[jax.Device] | None = None) -> Setup:
    """Mesh, shardings and optimizer for ``cfg``; raises ConfigError on a mesh that does
    not fit the devices or a dimension that does not divide its mesh axes."""
    mesh = shd.make_mesh(cfg.mesh, devices)
    if cfg.train.attention == "cudnn" and mesh.devices.flat[0].platform != "gpu":
        raise ConfigError(
            f"train.attention='cudnn' needs NVIDIA GPUs, but the devices are "
            f"{mesh.devices.flat[0].platform!r}; use train.attention=xla"
        )
    sizes = shd.mesh_sizes(mesh)
    rules = cfg.mesh.rules
    abstract_model = nnx.eval_shape(lambda: _new_model(cfg, 0))
    graphdef, abstract_params_state = nnx.split(abstract_model)
    param_specs = shd.param_partition_specs(abstract_params_state, rules, sizes)
    param_shardings = shd.state_shardings(abstract_params_state, mesh, rules)
    tx, lr_table = make_optimizer(cfg, cfg.train.scan_layers)
    rep = shd.replicated(mesh)

    abstract_params = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
        nnx.to_pure_dict(abstract_params_state),
    )
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: rep,
    )
    state_shardings = {"params": param_shardings, "opt": opt_shardings, "step": rep}
    abstract = {"params": abstract_params, "opt": abstract_opt,
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        state_shardings,
    )
    dp = sizes["data"] * sizes["fsdp"]
    num_micro = cfg.grad_accum_steps(dp)
    rows = cfg.train.global_batch_size // num_micro
    batch_shape = (num_micro, rows, cfg.data.seq_len + 1)
    batch_sharding = shd.batch_sharding(mesh, rules, batch_shape, BATCH_NAMES)
    return Setup(cfg=cfg, mesh=mesh, graphdef=graphdef, tx=tx, lr_table=lr_table,
                 num_micro=num_micro, rows_per_micro=rows, param_shardings=param_shardings,
                 state_shardings=state_shardings, abstract_state=abstract_state,
                 batch_sharding=batch_sharding, param_specs=param_specs)


def _place(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (identical on every process) as a global sharded array."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def init_state(setup: Setup, init_weights: dict[str, np.ndarray] | None = None) -> dict:
    """Sharded initial state: JAX-initialised (``train.seed``) or from HF tensors."""
    cfg, tx = setup.cfg, setup.tx
    step0 = jnp.zeros((), jnp.int32)
    if init_weights is None:
        def init() -> dict:
            model = _new_model(cfg, cfg.train.seed)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            return {"params": params, "opt": tx.init(params), "step": step0}

        return jax.jit(init, out_shardings=setup.state_shardings)()
    host = hf_to_params(init_weights, cfg.model, cfg.train.scan_layers, "--init-weights")
    params = jax.tree.map(_place, host, setup.param_shardings)

    def init_opt(params: dict) -> dict:
        return {"params": params, "opt": tx.init(params), "step": step0}

    return jax.jit(init_opt, out_shardings=setup.state_shardings, donate_argnums=0)(params)


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (gathers across processes)."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
    )


class Batches:
    """Global batches (M, B, T+1) of ``lmspec.data.Dataset``, built per process from
    the rows its devices hold."""

    def __init__(self, setup: Setup, dataset: Any) -> None:
        self.setup = setup
        self.ds = dataset

    def train(self, step: int) -> jax.Array:
        m_count, b, _ = self.setup.batch_shape
        cache: dict[tuple[int, int], np.ndarray] = {}

        def rows(index: tuple[slice, ...]) -> np.ndarray:
            r = index[1]
            r0 = 0 if r.start is None else r.start
            r1 = b if r.stop is None else r.stop
            if (r0, r1) not in cache:
                cache[(r0, r1)] = np.stack([
                    self.ds.global_batch_rows(step, m * b + r0, m * b + r1)
                    for m in range(m_count)
                ])
            return cache[(r0, r1)][index[0], :, index[2]]

        return jax.make_array_from_callback(self.setup.batch_shape, self.setup.batch_sharding,
                                            rows)

    def val(self, index: int) -> jax.Array:
        w = self.ds.val_batch(index, self.setup.cfg.train.global_batch_size)
        return _place(w.reshape(self.setup.batch_shape), self.setup.batch_sharding)


def _parse_steps(values: Iterable[int]) -> set[int]:
    return {int(v) for v in values}


def _versions() -> dict[str, str]:
    import flax
    import jaxlib
    import orbax.checkpoint

    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "orbax-checkpoint": orbax.checkpoint.__version__,
            "numpy": np.__version__}


def _peak_memory_bytes() -> int:
    stats = [d.memory_stats() for d in jax.local_devices() if d.platform != "cpu"]
    peaks = [s.get("peak_bytes_in_use", 0) for s in stats if s]
    if peaks:
        return int(sum(peaks))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


@dataclass
class TrainResult:
    summary: dict[str, Any]
    losses: dict[int, float]


def train(cfg: ExperimentConfig, *, init_weights: str | os.PathLike | None = None,
          dump_grads: Iterable[int] = (), dump_params: Iterable[int] = (),
          resume: bool = True, progress: bool = True,
          dataset: Any = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``cfg`` into ``cfg.train.out_dir`` (see the CLI contract in COMMON.md).

    Writes ``config.yaml``, ``metrics.jsonl``, TensorBoard events, checkpoints, dumps and
    ``run_summary.json``; resumes from the newest complete checkpoint unless ``resume``
    is False.
    """
    t_launch = time.perf_counter()
    t = cfg.train
    main = jax.process_index() == 0
    say = log or (lambda s: print(s, file=sys.stderr) if main else None)
    out = Path(t.out_dir)
    dump_grads, dump_params = _parse_steps(dump_grads), _parse_steps(dump_params)
    for flag, steps in (("--dump-grads", dump_grads), ("--dump-params", dump_params)):
        bad = sorted(s for s in steps if not 0 <= s < t.steps)
        if bad:
            raise ValueError(f"{flag}: steps {bad} are outside [0, train.steps={t.steps})")
    init_tensors = None
    if init_weights is not None:
        init_tensors = lw.load_safetensors(init_weights)
        lw.check_names(cfg.model, init_tensors, f"--init-weights {init_weights}")

    setup = build_setup(cfg)
    if dataset is None:
        dataset = Dataset.from_config(cfg, progress=progress and main)
    batches = Batches(setup, dataset)

    if main:
        out.mkdir(parents=True, exist_ok=True)
    if not resume and main and (out / "checkpoints").exists():
        say(f"--no-resume: removing old checkpoints in {out / 'checkpoints'}")
        shutil.rmtree(out / "checkpoints")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm_out_dir_ready")
    ckpts = Checkpoints(out, t.ckpt_keep)
    if ckpts.removed_partial:
        say(f"removed incomplete checkpoint folders: {ckpts.removed_partial}")
    start = 0
    latest = ckpts.latest_step() if resume else None
    if latest is not None:
        where = ckpts.directory / str(latest)
        check_resumable(ckpts.read_meta(latest).get("config"), cfg, ("model", "train.scan_layers"),
                        where)
        try:
            state, meta = ckpts.restore(latest, setup.abstract_state)
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"cannot resume from {where}: its state does not fit this config ({first}); "
                "pass --no-resume to start over or choose another train.out_dir"
            ) from e
        start = int(meta["step"])
        say(f"resumed from {ckpts.directory / str(latest)} (step {start})")
        if init_tensors is not None:
            say("note: --init-weights ignored, the checkpoint's weights are used")
    else:
        state = init_state(setup, init_tensors)
    if main:
        # only now: a refused resume must not overwrite the earlier run's config
        save_config(cfg, out / "config.yaml")
    rng_data = rng_key_data(t.seed)

    want_grads = bool(dump_grads)
    step_fn = make_train_step(setup.graphdef, setup.tx, setup.lr_table, t.precision,
                              return_grads=want_grads)
    metric_sh = shd.replicated(setup.mesh)
    out_sh: tuple[Any, ...] = (setup.state_shardings, metric_sh)
    if want_grads:
        out_sh = out_sh + (setup.param_shardings,)
    jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.batch_sharding),
                     out_shardings=out_sh, donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(setup.graphdef, t.precision),
                      in_shardings=(setup.param_shardings, setup.batch_sharding),
                      out_shardings=metric_sh)
    with shd.activation_sharding(setup.mesh, cfg.mesh.rules), matmul_precision(t.precision):
        t0 = time.perf_counter()
        compiled = jitted.lower(setup.abstract_state, _batch_struct(setup)).compile()
        compile_s = time.perf_counter() - t0
        eval_compiled = None
        if t.eval_every:
            eval_compiled = eval_fn.lower(setup.abstract_state["params"],
                                          _batch_struct(setup)).compile()
    say(f"compiled train_step in {compile_s:.2f}s; mesh {shd.mesh_sizes(setup.mesh)}, "
        f"{setup.num_micro} micro-batch(es) of {setup.rows_per_micro} rows")

    num_devices = jax.device_count()
    device_kind = jax.devices()[0].device_kind
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    writer = MetricsWriter(out / "metrics.jsonl", start_step=start) if main else None
    tb = _tensorboard(out) if main else None
    bar = None
    if main and progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    step_times: list[float] = []
    losses: dict[int, float] = {}
    first_step_at = None
    try:
        for step in range(start, t.steps):
            t_step = time.perf_counter()
            batch = batches.train(step)
            if want_grads:
                state, metrics, grads = compiled(state, batch)
            else:
                state, metrics = compiled(state, batch)
            m = jax.device_get(metrics)
            dt = time.perf_counter() - t_step
            if first_step_at is None:
                first_step_at = time.perf_counter()
            step_times.append(dt)
            loss = float(m["loss"])
            losses[step] = loss
            global_batch = to_host(batch).reshape(-1, cfg.data.seq_len + 1)
            tps = tokens_per_step / dt / num_devices
            rec: dict[str, Any] = {
                "step": step, "loss": loss, "grad_norm": float(m["grad_norm"]),
                "lr": float(m["lr"]), "tokens_per_s": tps,
                "mfu": flops.mfu(tps, cfg.model, cfg.data.seq_len, device_kind),
                "batch_fingerprint": fingerprint(global_batch), "wall_time": time.time(),
            }
            if step in dump_grads:
                g = to_host(grads)
                if main:
                    lw.save_safetensors(params_to_hf(g, cfg.model, t.scan_layers),
                                        out / "dumps" / f"grads_step{step}.safetensors")
            if step in dump_params:
                p = to_host(state["params"])
                if main:
                    lw.save_safetensors(params_to_hf(p, cfg.model, t.scan_layers),
                                        out / "dumps" / f"params_step{step}.safetensors")
            if eval_compiled is not None and (step + 1) % t.eval_every == 0:
                vals = [float(eval_compiled(state["params"], batches.val(i)))
                        for i in range(t.eval_batches)]
                rec["val_loss"] = float(np.mean(vals))
            if main:
                # the record goes out before the checkpoint: a crash in between resumes
                # from the previous checkpoint, and MetricsWriter drops the later records
                writer.write(rec)
                _tb_write(tb, rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps * num_devices:.0f}")
                elif (step + 1) % t.log_every == 0:
                    say(f"step {step} loss {loss:.4f} tokens/s/device {tps:.0f}")
            done = step + 1
            if (t.ckpt_every and done % t.ckpt_every == 0) or done == t.steps:
                ckpts.save(done, state, {"step": done, "rng": rng_data.tolist(),
                                         "config": cfg.to_dict()})
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if tb is not None:
            tb.close()
        ckpts.close()

    kept = step_times[t.warmup_steps_excluded:] or step_times
    med = statistics.median(kept) if kept else None
    tps_dev = (statistics.mean(tokens_per_step / s for s in kept) / num_devices) if kept else None
    summary = {
        "side": "jax",
        "precision": t.precision,
        "steps": t.steps,
        "start_step": start,
        "num_devices": num_devices,
        "num_processes": jax.process_count(),
        "device_kind": device_kind,
        "mesh": shd.mesh_sizes(setup.mesh),
        "num_micro_batches": setup.num_micro,
        "tokens_per_s": tps_dev,
        "tokens_per_s_total": tps_dev * num_devices if tps_dev is not None else None,
        "step_time_s": med,
        "mfu": (flops.mfu(tps_dev, cfg.model, cfg.data.seq_len, device_kind)
                if tps_dev is not None else None),
        "compile_s": compile_s,
        "startup_s": (first_step_at - t_launch) if first_step_at else None,
        "peak_memory_bytes": _peak_memory_bytes(),
        "final_loss": losses[max(losses)] if losses else None,
        "versions": _versions(),
    }
    if main:
        atomic_write_json(out / "run_summary.json", summary)
    return TrainResult(summary=summary, losses=losses)


def _batch_struct(setup: Setup) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(setup.batch_shape, jnp.int32, sharding=setup.batch_sharding)


def _tensorboard(out: Path) -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover - listed in the dependencies
        return None
    return SummaryWriter(logdir=str(out / "tb"))


def _tb_write(tb: Any, rec: dict[str, Any]) -> None:
    if tb is None:
        return
    for k in ("loss", "grad_norm", "lr", "tokens_per_s", "val_loss", "mfu"):
        v = rec.get(k)
        if v is not None:
            tb.add_scalar(f"train/{k}", v, rec["step"])
