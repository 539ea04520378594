"""The training loop: mesh, sharded state, compiled step, prefetched batches, records,
asynchronous checkpoints.

Shape legend: M micro-batches per optimizer step, B rows per micro-batch (the
data-parallel batch: ``train.micro_batch_size * mesh.data * mesh.fsdp``), T sequence
length, G = M * B the global batch.

State ``{"params", "opt", "step"}`` is created directly sharded (the init is jitted
with ``out_shardings``), and ``train_step`` is compiled ahead of time with explicit in
and out shardings and the state donated. The loop never waits for the step it has just
dispatched: the next batch is put on the devices while the step runs
(:mod:`jaxlm.batches`), the step's metrics are read once the following step is
dispatched (:mod:`jaxlm.recorder`), and checkpoints are written in the background
(:mod:`jaxlm.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
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

from jaxlm import hostmem, tuning
from jaxlm import sharding as shd
from jaxlm.api import matmul_precision
from jaxlm.batches import Batches, FedBatch
from jaxlm.checkpoint import Checkpoints, rng_key_data
from jaxlm.model import Llama, compute_dtype
from jaxlm.recorder import Recorder
from jaxlm.step import make_eval_step, make_optimizer, make_train_step
from jaxlm.weights import hf_to_params, params_to_hf
from lmspec import integrity, runs
from lmspec import weights as lw
from lmspec.config import ConfigError, ExperimentConfig, check_resumable, save_config
from lmspec.data import Dataset
from lmspec.errors import UserError
from lmspec.io import ensure_writable_dir
from lmspec.wandb_log import require_wandb

JAX_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")

BATCH_NAMES = (None, "act_batch", None)  # (M, B, T+1)


@dataclass
class Setup:
    """Everything static about a run on a given mesh (``cfg``: ``auto`` resolved)."""

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

    @property
    def platform(self) -> str:
        return tuning.platform_of(self.mesh.devices.flat)


def _new_model(cfg: ExperimentConfig, seed: int) -> Llama:
    t = cfg.train
    return Llama(cfg.model, rngs=nnx.Rngs(params=seed), dtype=compute_dtype(t.precision),
                 scan_layers=t.scan_layers, remat=t.remat, attention=t.attention)


def resolve_auto(cfg: ExperimentConfig, devices: list[jax.Device], sizes: dict[str, int]
                 ) -> ExperimentConfig:
    """``cfg`` with ``train.attention`` / ``train.remat`` ``auto`` replaced by what
    :mod:`jaxlm.tuning` picks for these devices and mesh sizes."""
    t = cfg.train
    attention = tuning.resolve_attention(t.attention, cfg.model, t.precision, devices)
    remat = tuning.resolve_remat(
        t.remat, cfg, rows_per_device=t.micro_batch_size,
        param_shards=sizes["fsdp"] * sizes["tensor"], attention=attention,
        device_bytes=tuning.device_memory_bytes(devices))
    if (attention, remat) == (t.attention, t.remat):
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(t, attention=attention,
                                                              remat=remat))


def build_setup(cfg: ExperimentConfig, devices: list[jax.Device] | None = None) -> Setup:
    """Mesh, shardings and optimizer for ``cfg``; raises ConfigError on a mesh that does
    not fit the devices or a dimension that does not divide its mesh axes.
    ``Setup.cfg`` is ``cfg`` with ``auto`` settings resolved (:func:`resolve_auto`)."""
    mesh = shd.make_mesh(cfg.mesh, devices)
    if cfg.train.attention == "cudnn" and mesh.devices.flat[0].platform != "gpu":
        raise ConfigError(
            f"train.attention='cudnn' needs NVIDIA GPUs, but the devices are "
            f"{mesh.devices.flat[0].platform!r}; use train.attention=xla or auto"
        )
    sizes = shd.mesh_sizes(mesh)
    cfg = resolve_auto(cfg, list(mesh.devices.flat), sizes)
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




# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    summary: dict[str, Any]
    losses: dict[int, float]


@dataclass
class Program:
    """The compiled train step (state donated) and eval step."""

    step: Any
    evaluate: Any | None
    returns_grads: bool
    compile_s: float
    memory: dict[str, int]


@dataclass
class Run:
    """A run opened in ``train.out_dir``: setup, data, checkpoints and the state to
    continue from (restored or fresh)."""

    cfg: ExperimentConfig
    setup: Setup
    batches: Batches
    ckpts: Checkpoints
    state: dict
    start: int
    out: Path
    main: bool
    say: Callable[[str], None]

    def checkpoint_meta(self, done: int) -> dict[str, Any]:
        return checkpoint_meta(self.cfg, done)


def checkpoint_meta(cfg: ExperimentConfig, done: int) -> dict[str, Any]:
    """The record saved with checkpoint ``done`` (steps done): step, base RNG key, config."""
    return {"step": done, "rng": rng_key_data(cfg.train.seed).tolist(),
            "config": cfg.to_dict()}


def open_run(cfg: ExperimentConfig, *, init_weights: str | os.PathLike | None,
             resume: bool, progress: bool, dataset: Any,
             say: Callable[[str], None]) -> Run:
    """Prepare ``train.out_dir``, then restore the newest complete checkpoint (unless
    ``resume`` is False) or initialise; ``config.yaml`` is written only after a resume
    was accepted."""
    main = jax.process_index() == 0
    out = Path(cfg.train.out_dir)
    if main:  # before any work: a run that cannot write its results stops here
        ensure_writable_dir(out, "train.out_dir")
        runs.check_run_owner(out, "jax")
    init_tensors = None
    if init_weights is not None:
        from lmspec.hf import load_init_weights

        init_tensors = load_init_weights(init_weights, cfg.model)
    setup = build_setup(cfg)
    if dataset is None:
        dataset = Dataset.from_config(cfg, progress=progress and main)
    batches = Batches(dataset, setup.batch_shape, setup.batch_sharding,
                      cfg.train.global_batch_size)
    ckpts = _prepare_out_dir(out, cfg, resume, main, say)
    latest = ckpts.latest_step() if resume else None
    if latest is None:
        state, start = init_state(setup, init_tensors), 0
    else:
        state, start = _restore(ckpts, latest, setup, cfg, say)
        say(f"resumed from {ckpts.directory / str(latest)} (step {start})")
        if init_tensors is not None:
            say("note: --init-weights ignored, the checkpoint's weights are used")
    del init_tensors  # the host copy is not needed once the state is on the devices
    if main:
        save_config(cfg, out / "config.yaml")
    return Run(cfg=cfg, setup=setup, batches=batches, ckpts=ckpts, state=state, start=start,
               out=out, main=main, say=say)


def _prepare_out_dir(out: Path, cfg: ExperimentConfig, resume: bool, main: bool,
                     say: Callable[[str], None]) -> Checkpoints:
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if not resume and main and (out / "checkpoints").exists():
        say(f"--no-resume: removing old checkpoints in {out / 'checkpoints'}")
        shutil.rmtree(out / "checkpoints")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm_out_dir_ready")
    ckpts = Checkpoints(out, cfg.train.ckpt_keep)
    if ckpts.removed_partial:
        say(f"removed incomplete checkpoint folders: {ckpts.removed_partial}")
    return ckpts


def _restore(ckpts: Checkpoints, latest: int, setup: Setup, cfg: ExperimentConfig,
             say: Callable[[str], None]) -> tuple[dict, int]:
    """Verify checkpoint ``latest`` (checksums, then its record), then restore it; every
    problem is a :class:`UserError` raised before anything in the run folder is written."""
    where = ckpts.step_dir(latest)
    todo = ckpts.resume_advice(latest)
    if not ckpts.verify(latest, todo):
        say(f"warning: {where} has no {integrity.CHECKSUMS} (written by an older version, "
            "or the process stopped right after the save): resuming from it unverified")
    check_resumable(ckpts.read_meta(latest, todo).get("config"), cfg,
                    ("model", "train.scan_layers"), where)
    try:
        state, meta = ckpts.restore(latest, setup.abstract_state)
    except json.JSONDecodeError as e:  # a ValueError, but a damaged file, not a misfit
        raise UserError(f"cannot resume from {where}: a metadata file is not valid JSON "
                        f"({e}); {todo}") from e
    except (ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot resume from {where}: its state does not fit this config ({first}); "
            "pass --no-resume to start over or choose another train.out_dir"
        ) from e
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore errors for unreadable files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot resume from {where}: its files cannot be read ({first}); "
                        f"{todo}") from e
    return state, int(meta["step"])


def compile_program(setup: Setup, *, return_grads: bool) -> Program:
    """AOT-compile the donated train step (and the eval step when ``train.eval_every``),
    with the GPU compile options of :mod:`jaxlm.tuning` on GPUs."""
    t = setup.cfg.train
    step_fn = make_train_step(setup.graphdef, setup.tx, setup.lr_table, t.precision,
                              return_grads=return_grads)
    metric_sh = shd.replicated(setup.mesh)
    out_sh: tuple[Any, ...] = (setup.state_shardings, metric_sh)
    if return_grads:
        out_sh = out_sh + (setup.param_shardings,)
    jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.batch_sharding),
                     out_shardings=out_sh, donate_argnums=0)
    options = tuning.compiler_options(setup.platform)
    batch = jax.ShapeDtypeStruct(setup.batch_shape, jnp.int32, sharding=setup.batch_sharding)
    with shd.activation_sharding(setup.mesh, setup.cfg.mesh.rules), \
            matmul_precision(t.precision):
        t0 = time.perf_counter()
        compiled = jitted.lower(setup.abstract_state, batch).compile(options or None)
        compile_s = time.perf_counter() - t0
        evaluate = None
        if t.eval_every:
            eval_fn = jax.jit(make_eval_step(setup.graphdef, t.precision),
                              in_shardings=(setup.param_shardings, setup.batch_sharding),
                              out_shardings=metric_sh)
            evaluate = eval_fn.lower(setup.abstract_state["params"], batch).compile(
                options or None)
    return Program(step=compiled, evaluate=evaluate, returns_grads=return_grads,
                   compile_s=compile_s, memory=_memory_analysis(compiled))


def _memory_analysis(compiled: Any) -> dict[str, int]:
    """XLA's static buffer sizes of the compiled step, per device (bytes)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
             "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {n: int(getattr(m, n)) for n in names if getattr(m, n, None) is not None}


def train(cfg: ExperimentConfig, *, init_weights: str | os.PathLike | None = None,
          dump_grads: Iterable[int] = (), dump_params: Iterable[int] = (),
          resume: bool = True, progress: bool = True,
          dataset: Any = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``cfg`` into ``cfg.train.out_dir`` (the contract: docs/jaxlm.md).

    Writes ``config.yaml``, ``metrics.jsonl``, TensorBoard events, checkpoints, dumps and
    ``run_summary.json``; resumes from the newest complete checkpoint unless ``resume``
    is False.
    """
    t_launch = time.perf_counter()
    main = jax.process_index() == 0
    say = log or (lambda s: print(s, file=sys.stderr) if main else None)
    dumps = Dumps(set(dump_grads), set(dump_params))
    runs.check_dump_steps(cfg.train.steps, dumps.grads, dumps.params)
    if main:  # process 0 logs to W&B: a missing package stops the run before any work
        require_wandb(cfg)
    on_cpu = jax.devices()[0].platform == "cpu"
    if on_cpu:  # device buffers are host heap memory: give freed blocks back
        hostmem.configure_host_allocator()
    run = open_run(cfg, init_weights=init_weights, resume=resume, progress=progress,
                   dataset=dataset, say=say)
    program = compile_program(run.setup, return_grads=bool(dumps.grads))
    if on_cpu:
        hostmem.release_free_memory()  # set-up and compile-time memory
    _say_compiled(run, program)
    rec = Recorder(cfg, run.out, start=run.start, main=main, progress=progress,
                   num_devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
                   say=say)
    failed = True
    try:
        _loop(run, program, rec, dumps)
        failed = False
    finally:
        rec.close(failed=failed)
        run.ckpts.close()  # waits for the save in flight
    summary = _summary(run, program, rec, t_launch)
    if main:
        runs.write_run_summary(run.out, summary)
    return TrainResult(summary=summary, losses=rec.losses)


@dataclass
class Dumps:
    """Steps whose accumulated gradient / updated params are written to ``dumps/``."""

    grads: set[int]
    params: set[int]


def _loop(run: Run, program: Program, rec: Recorder, dumps: Dumps) -> None:
    """dispatch step -> put the next batch -> record the previous step -> dump, evaluate
    and save as due."""
    t = run.cfg.train
    state = run.state
    run.state = {}  # donated by the first step: no stale reference
    if run.start:
        rec.guard.last_checkpoint = str(run.ckpts.step_dir(run.start))
    batch = run.batches.train(run.start) if run.start < t.steps else None
    for step in range(run.start, t.steps):
        dispatched = time.perf_counter()
        state, metrics, grads = _dispatch(program, state, batch)
        next_batch = run.batches.train(step + 1) if step + 1 < t.steps else None
        rec.add(step, metrics, batch, dispatched)
        if step in dumps.grads:
            _dump(run, "grads", step, grads)
        if step in dumps.params:
            _dump(run, "params", step, state["params"])
        done = step + 1
        if program.evaluate is not None and done % t.eval_every == 0:
            rec.attach(step, "val_loss", [program.evaluate(state["params"], run.batches.val(i))
                                          for i in range(t.eval_batches)])
        if (t.ckpt_every and done % t.ckpt_every == 0) or done == t.steps:
            # records go out before their checkpoint: a crash in between resumes from
            # the previous checkpoint, and MetricsWriter drops the later records; writing
            # them checks every step so far (nan_policy), so no save follows a bad step
            rec.flush()
            run.ckpts.save(done, state, run.checkpoint_meta(done))
            rec.guard.last_checkpoint = str(run.ckpts.step_dir(done))
        batch = next_batch
    rec.flush()


def _dispatch(program: Program, state: dict, batch: FedBatch | None) -> tuple[Any, Any, Any]:
    assert batch is not None
    if program.returns_grads:
        return program.step(state, batch.array)
    state, metrics = program.step(state, batch.array)
    return state, metrics, None


def _dump(run: Run, kind: str, step: int, tree: Any) -> None:
    host = to_host(tree)
    if run.main:
        cfg = run.cfg
        lw.save_safetensors(params_to_hf(host, cfg.model, cfg.train.scan_layers),
                            run.out / "dumps" / f"{kind}_step{step}.safetensors")


def _say_compiled(run: Run, program: Program) -> None:
    s, t = run.setup, run.setup.cfg.train
    run.say(f"compiled train_step in {program.compile_s:.2f}s; mesh {shd.mesh_sizes(s.mesh)}, "
            f"{s.num_micro} micro-batch(es) of {s.rows_per_micro} rows; attention "
            f"{t.attention}, remat {t.remat}")


def peak_memory() -> tuple[int, int]:
    """(this process's peak, the peak per device) in bytes. Accelerators: the allocator's
    peaks (summed; the largest device's). CPU: the process's resident-set peak, and that
    peak shared equally by its virtual devices, which live in the one process (DeepSpeed
    on CPU runs one process per device, so its per-process peak is per device)."""
    stats = [d.memory_stats() for d in jax.local_devices() if d.platform != "cpu"]
    peaks = [int(st.get("peak_bytes_in_use", 0)) for st in stats if st]
    if peaks:
        return sum(peaks), max(peaks)
    rss = runs.peak_rss_bytes()
    return rss, rss // max(1, jax.local_device_count())


def _summary(run: Run, program: Program, rec: Recorder, t_launch: float) -> dict[str, Any]:
    setup = run.setup
    process_peak, device_peak = peak_memory()
    return runs.run_summary(
        side="jax", cfg=run.cfg, step_times=rec.step_times, start_step=run.start,
        num_devices=jax.device_count(), num_processes=jax.process_count(),
        device_kind=jax.devices()[0].device_kind, num_micro_batches=setup.num_micro,
        peak_memory_bytes=process_peak, peak_memory_per_device_bytes=device_peak,
        startup_s=(rec.first_ready - t_launch) if rec.first_ready else None,
        final_loss=rec.losses[max(rec.losses)] if rec.losses else None,
        versions=runs.versions(*JAX_DISTRIBUTIONS),
        compile_s=program.compile_s, mesh=shd.mesh_sizes(setup.mesh),
        attention=setup.cfg.train.attention, remat=setup.cfg.train.remat,
        compiled_memory=program.memory,
    )
