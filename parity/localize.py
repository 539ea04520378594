"""Where did the port go wrong? The first place the JAX side leaves its noise.

:func:`diagnose` walks the run in the order the computation happens and names the first
quantity over its noise, as a one-line ``headline`` plus a ``category``:

1. **data** (``data``): the first step, and where the trainers log
   ``batch_fingerprint_parts`` the first part (micro-step, rank), whose fingerprints differ.
2. **forward** (``forward:<component>``): step-0 activations captured layer by layer
   in process (embedding; per block the input norm, attention output, post-attention
   norm and MLP output; final norm; logits), JAX through ``jaxlm.model`` (so an import
   overlay on jaxlm is seen), torch through forward hooks on ``torchlm``'s model, and a
   float64 torch pass as the truth. Noise = torch fp32's relative L2 distance from the
   truth; JAX is over when its distance exceeds ``FWD_MULTIPLE`` x noise + ``FWD_ABS``.
3. **loss** (``loss``): the step-0 loss each side logged against the float64 loss.
4. **gradients** (``gradient:<tensor>``): each step-0 gradient dump against the float64
   gradient, in model order; noise = DeepSpeed fp32's distance.
5. **optimizer** (``optimizer:<setting>``): each tensor's step-0 update against exact
   float64 AdamW of JAX's *own* dumped gradient (noise: DeepSpeed's update against AdamW
   of its own gradient); for the tensors over, the single setting (learning rate, eps
   placement, decay mask, decay coefficient, bias correction, clipping kind) whose change
   explains JAX's update is named.
6. **later steps** (``optimizer:after_step0``): step 0 clean but the loss curves part
   later: something only later steps use (betas, optimizer state, schedule).

bf16 (``bf16:<quantity>``), when fp32 is clean: JAX bf16 against torch/DeepSpeed bf16 on
the forward activations, the step-0 loss and the per-tensor gradients, each judged
against a floor: how far two faithful bf16 implementations (Hugging Face's and
torchlm's, in process; two DeepSpeed stages where the run has them) are apart.

The heavy pieces (activation capture, float64 truth, AdamW variants) are separate
functions, testable without trainers. Numbers here are localisation thresholds (which
quantity to name first), not pass/fail limits; those live in :mod:`parity.limits`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmspec.config import ExperimentConfig, OptimConfig
from lmspec.schedule import lr_at
from lmspec.weights import decays, param_shapes
from parity import limits as L

# A JAX activation is over when rel_err(jax, f64) > FWD_MULTIPLE * rel_err(torch32, f64)
# + FWD_ABS. Measured clean (tiny seeds 0-9 and the odd shape, in process): JAX's
# error is at most 1.02x torch's, so the worst clean activation sits at 0.066 of this
# limit; the planted forward bugs sit 1e4x above it.
FWD_MULTIPLE = 10.0
FWD_ABS = 1e-6  # relative; covers activations both compute exactly (embedding rows)
# Gradients and the step-0 loss: same rule. Clean: JAX's gradient error at most 1.6x
# torch's (worst tensor at 0.11 of the limit). The loss: with LOSS_ABS at one fp32 ulp
# the worst clean seed sat at 0.51 of the limit (torch's own error happened to be tiny),
# so LOSS_ABS allows a few ulps of a loss near 6 (one ulp is ~8e-8 relative).
GRAD_MULTIPLE = 10.0
GRAD_ABS = 1e-6
LOSS_MULTIPLE = 10.0
LOSS_ABS = 5e-7
# Optimizer: update vs exact AdamW of its own gradient. DeepSpeed's own distance carries
# the ill-conditioned elements (|clipped g| near eps: up to 2.4e-4 on the norm gains);
# the planted optimizer bugs sit >= 10x above the limit this gives.
OPT_MULTIPLE = 10.0
OPT_ABS = 1e-5
# Later steps: fp32 loss rel diff allowed before naming a later-step divergence; clean
# JAX vs DeepSpeed fp32 stays below 1e-6 over 20 steps (issue 9: ~1e-7).
LATER_LOSS_REL = 2e-5
# bf16: JAX bf16 <-> torch bf16 against the distance of two faithful bf16
# implementations: parity.limits.BF16_ACT_MULTIPLE and BF16_ACT_SCALE_FRACTION (the
# same rule as the bf16 activations check, used here for the loss and gradients too).
# The bf16 loss curve is judged over the first steps only, before two faithful bf16 runs
# drift apart (issue 9: the gap/floor of clean runs swings over 50 chaotic steps); clean
# tiny seed 0 sat at 0.125 of the bf16 scale over 10 steps (0.5 of the limit), the
# planted loss softmax in bf16 at 0.52 (2x the limit).
BF16_CURVE_STEPS = 10

Arrays = Mapping[str, np.ndarray]


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def rel_err(test: Any, ref: Any) -> float:
    """``||test - ref|| / ||ref||`` in float64 (0 when both vanish, inf when only ref)."""
    t, r = _f64(test), _f64(ref)
    if t.shape != r.shape:
        raise ValueError(f"rel_err: shapes differ, {t.shape} vs {r.shape}")
    num, den = float(np.linalg.norm(t - r)), float(np.linalg.norm(r))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _g(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


# ----------------------------------------------------------------------------- capture


def activation_names(num_layers: int) -> list[str]:
    """The captured activations in the order the forward pass produces them."""
    names = ["embedding"]
    for i in range(num_layers):
        names += [f"layer {i} input_layernorm", f"layer {i} self_attn",
                  f"layer {i} post_attention_layernorm", f"layer {i} mlp"]
    return names + ["final norm", "logits"]


def _hooked_forward(body: Any, forward: Callable[[], Any]) -> tuple[dict[str, np.ndarray], Any]:
    """Run ``forward()`` (no grad) with forward hooks on a Llama body's embedding, each
    layer's norms, attention and MLP, and final norm (torchlm's and Hugging Face's share
    these module names); returns the outputs as float64 numpy by
    :func:`activation_names` name, and what ``forward`` returned."""
    import torch

    out: dict[str, np.ndarray] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_mod: Any, _inp: Any, y: Any) -> None:
            y = y[0] if isinstance(y, tuple) else y  # HF attention returns (out, weights)
            out[name] = y.detach().to(torch.float64).numpy()
        return hook

    hooks = [body.embed_tokens.register_forward_hook(keep("embedding"))]
    for i, layer in enumerate(body.layers):
        for sub in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            hooks.append(getattr(layer, sub).register_forward_hook(keep(f"layer {i} {sub}")))
    hooks.append(body.norm.register_forward_hook(keep("final norm")))
    try:
        with torch.no_grad():
            result = forward()
    finally:
        for h in hooks:
            h.remove()
    return out, result


def torch_activations(cfg: ExperimentConfig, weights: Arrays, tokens_bt: np.ndarray,
                      dtype: str) -> dict[str, np.ndarray]:
    """Activations of ``torchlm``'s model (forward hooks) in ``fp32``, ``bf16`` or
    ``fp64`` (the fp32 module cast to float64: the truth), as float64 numpy."""
    import torch

    from torchlm import api as tapi

    tapi.configure_torch()
    model = tapi.build_model(cfg.model, dict(weights), "bf16" if dtype == "bf16" else "fp32")
    if dtype == "fp64":
        model = model.double()
    out, logits = _hooked_forward(
        model.model, lambda: model(torch.from_numpy(np.asarray(tokens_bt, np.int64))))
    out["logits"] = logits.detach().to(torch.float64).numpy()
    return {k: out[k] for k in activation_names(cfg.model.num_hidden_layers)}


def jax_activations(cfg: ExperimentConfig, weights: Arrays, tokens_bt: np.ndarray,
                    precision: str) -> dict[str, np.ndarray]:
    """Activations of ``jaxlm.model.Llama`` (looked up at call time, so a planted overlay
    is what runs), layers unrolled and run eagerly, weights cast to the compute dtype
    as the trainer does; each norm, attention and MLP call is recorded by wrapping the
    class's ``__call__`` for the duration."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm import api as japi
    from jaxlm import model as jm
    from jaxlm import tuning
    from jaxlm.weights import hf_to_params

    dt = jm.compute_dtype(precision)
    # ``auto`` resolved for one device, as jaxlm.api and the trainer resolve it
    attention = tuning.resolve_attention(cfg.train.attention, cfg.model, precision,
                                         jax.devices()[:1])
    abstract = nnx.eval_shape(lambda: jm.Llama(cfg.model, rngs=nnx.Rngs(0), dtype=dt,
                                               scan_layers=False, remat="none",
                                               attention=attention))
    graphdef, _ = nnx.split(abstract)
    params = hf_to_params(dict(weights), cfg.model, False, "weights")
    cast = jax.tree.map(lambda p: jnp.asarray(p).astype(dt), params)
    calls: list[tuple[str, Any, Any]] = []
    saved = []
    for kind, cls in (("norm", jm.RMSNorm), ("attn", jm.Attention), ("mlp", jm.MLP)):
        orig = cls.__call__

        def wrapped(self: Any, x: Any, _orig: Any = orig, _kind: str = kind) -> Any:
            y = _orig(self, x)
            calls.append((_kind, x, y))
            return y

        saved.append((cls, orig))
        cls.__call__ = wrapped
    try:
        with japi.matmul_precision(precision):
            model = nnx.merge(graphdef, cast)
            logits = model(jnp.asarray(tokens_bt, jnp.int32))
    finally:
        for cls, orig in saved:
            cls.__call__ = orig
    n = cfg.model.num_hidden_layers
    norms = [c for c in calls if c[0] == "norm"]
    attns = [c for c in calls if c[0] == "attn"]
    mlps = [c for c in calls if c[0] == "mlp"]
    if len(norms) != 2 * n + 1 or len(attns) != n or len(mlps) != n:
        raise RuntimeError(f"jax_activations: expected {2 * n + 1} norm, {n} attention and "
                           f"{n} MLP calls, saw {len(norms)}, {len(attns)}, {len(mlps)}")

    def np64(x: Any) -> np.ndarray:
        return np.asarray(jnp.asarray(x, jnp.float32), np.float64)

    out = {"embedding": np64(norms[0][1])}
    for i in range(n):
        out[f"layer {i} input_layernorm"] = np64(norms[2 * i][2])
        out[f"layer {i} self_attn"] = np64(attns[i][2])
        out[f"layer {i} post_attention_layernorm"] = np64(norms[2 * i + 1][2])
        out[f"layer {i} mlp"] = np64(mlps[i][2])
    out["final norm"] = np64(norms[2 * n][2])
    out["logits"] = np64(logits)
    return out


def hf_activations(cfg: ExperimentConfig, weights: Arrays, tokens_bt: np.ndarray,
                   dtype: str = "bf16") -> dict[str, np.ndarray]:
    """The same activations from Hugging Face's ``LlamaForCausalLM`` (eager attention,
    softmax in fp32) in ``bf16`` or ``fp32``: a second faithful torch implementation,
    whose distance from torchlm is the floor a faithful JAX port is held to in bf16."""
    import torch

    from torchlm import api as tapi

    tapi.configure_torch()
    model = tapi.hf_model(cfg.model, dict(weights))
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    out, res = _hooked_forward(model.model, lambda: model(
        input_ids=torch.from_numpy(np.asarray(tokens_bt, np.int64)), use_cache=False))
    out["logits"] = res.logits.detach().to(torch.float64).numpy()
    return {k: out[k] for k in activation_names(cfg.model.num_hidden_layers)}


def bf16_loss_and_grads(cfg: ExperimentConfig, weights: Arrays, batch: np.ndarray,
                        num_micro: int, which: str) -> tuple[float, dict[str, np.ndarray]]:
    """Token-mean loss and fp32-accumulated gradient of ``batch`` in bf16, split into
    ``num_micro`` micro-batches, by ``torchlm`` (``which="torch"``) or Hugging Face
    (``"hf"``): two faithful bf16 implementations, for the bf16 floor."""
    import torch
    import torch.nn.functional as F

    from torchlm import api as tapi

    if which == "torch":
        return tapi.loss_and_grads(cfg, dict(weights), np.asarray(batch), "bf16", num_micro)
    tapi.configure_torch()
    model = tapi.hf_model(cfg.model, dict(weights)).to(torch.bfloat16)
    w = torch.from_numpy(np.asarray(batch, np.int64))
    params = dict(model.named_parameters())
    acc = {k: torch.zeros(p.shape, dtype=torch.float32) for k, p in params.items()}
    total = 0.0
    for chunk in w.chunk(num_micro, dim=0):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                               chunk[:, 1:].reshape(-1)) / num_micro
        loss.backward()
        total += float(loss.detach())
        for k, p in params.items():
            if p.grad is not None:
                acc[k] += p.grad.float()
    names = list(param_shapes(cfg.model))
    return total, {k: acc[k].numpy() for k in names}


def float64_truth(cfg: ExperimentConfig, weights: Arrays, batch: np.ndarray
                  ) -> tuple[float, dict[str, np.ndarray]]:
    """Step-0 token-mean loss and gradient of the global ``batch`` (G, T+1) in float64."""
    import torch

    from torchlm import api as tapi

    model = tapi.build_model(cfg.model, dict(weights), "fp32").double()
    loss = model.loss(torch.from_numpy(np.asarray(batch, np.int64)))
    loss.backward()
    return float(loss.detach()), {k: p.grad.detach().numpy()
                                  for k, p in model.named_parameters()}


# ----------------------------------------------------------------------------- comparisons


@dataclass
class Row:
    """One compared quantity: JAX's distance, the reference's, and the limit of this
    localisation (``over`` when ``err > limit``)."""

    name: str
    err: float
    noise: float
    limit: float

    @property
    def over(self) -> bool:
        return not self.err <= self.limit  # NaN is over

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "err": self.err, "noise": self.noise, "limit": self.limit,
                "over": self.over}


def compare_to_truth(test: Arrays, ref: Arrays, truth: Arrays, names: Sequence[str],
                     multiple: float, abs_tol: float) -> list[Row]:
    """Per name: ``err = rel_err(test, truth)``, ``noise = rel_err(ref, truth)``, limit
    ``multiple * noise + abs_tol`` (fp32: JAX judged by the reference's own error)."""
    rows = []
    for n in names:
        err, noise = rel_err(test[n], truth[n]), rel_err(ref[n], truth[n])
        rows.append(Row(n, err, noise, multiple * noise + abs_tol))
    return rows


def compare_to_reference(test: Arrays, ref: Arrays, truth: Arrays, names: Sequence[str],
                         ratio: float) -> list[Row]:
    """Per name (bf16): ``err = rel_err(test, ref)`` against ``ratio`` times the bf16
    scale ``noise = rel_err(ref, truth)``."""
    rows = []
    for n in names:
        err, scale = rel_err(test[n], ref[n]), rel_err(ref[n], truth[n])
        rows.append(Row(n, err, scale, ratio * scale))
    return rows


def first_over(rows: Sequence[Row]) -> Row | None:
    return next((r for r in rows if r.over), None)


# ----------------------------------------------------------------------------- data


def data_divergence(test: Any, ref: Any, world_size: int) -> dict[str, Any] | None:
    """The first step whose logged fingerprints differ (and the first differing part,
    micro-step and rank where both sides log ``batch_fingerprint_parts``); None if none."""
    t = {int(r["step"]): r for r in test.metrics}
    r_ = {int(r["step"]): r for r in ref.metrics}
    for s in sorted(set(t) & set(r_)):
        a, b = t[s], r_[s]
        if a.get("batch_fingerprint") == b.get("batch_fingerprint"):
            continue
        out: dict[str, Any] = {"step": s, "test": test.spec.label, "ref": ref.spec.label}
        pa, pb = a.get("batch_fingerprint_parts"), b.get("batch_fingerprint_parts")
        if pa and pb:
            k = next((i for i, (x, y) in enumerate(zip(pa, pb, strict=False)) if x != y),
                     min(len(pa), len(pb)))
            out.update(part=k, micro_step=k // world_size, rank=k % world_size,
                       parts_differing=sum(x != y for x, y in zip(pa, pb, strict=False)))
        return out
    return None


# ----------------------------------------------------------------------------- optimizer


def adamw_step0(grads: Arrays, params: Arrays, optim: OptimConfig, *,
                lr: float | None = None, eps_inside: bool = False, decay: str | None = None,
                decay_lr_scaled: bool = True, coupled: bool = False, clip: str = "global",
                clip_eps: float = 0.0, bias1: bool = True, bias2: bool = True
                ) -> dict[str, np.ndarray]:
    """Exact (float64) first AdamW update of every tensor, with one setting changeable:
    ``lr``, eps inside the sqrt, decay mask (``decay`` = a ``wd_mask`` policy), decay not
    scaled by the LR, L2 coupled into the gradient, clipping ``global``/``tensor``/
    ``none``, bias correction of either moment. Defaults: torch.optim.AdamW after
    global-norm clipping, as the config says."""
    lr = lr_at(0, optim) if lr is None else lr
    policy = optim.wd_mask if decay is None else decay
    g = {k: _f64(v) for k, v in grads.items()}
    if optim.grad_clip > 0 and clip == "global":
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in g.values()))
        c = min(1.0, optim.grad_clip / (norm + clip_eps)) if norm + clip_eps > 0 else 1.0
        g = {k: v * c for k, v in g.items()}
    elif optim.grad_clip > 0 and clip == "tensor":
        g = {k: v * min(1.0, optim.grad_clip / max(float(np.linalg.norm(v)), 1e-300))
             for k, v in g.items()}
    out = {}
    for k, gk in g.items():
        p = _f64(params[k])
        wd = optim.weight_decay if decays(k, p.shape, policy) else 0.0
        if coupled:
            gk = gk + wd * p
        m = (1 - optim.beta1) * gk / ((1 - optim.beta1) if bias1 else 1.0)
        v = (1 - optim.beta2) * gk * gk / ((1 - optim.beta2) if bias2 else 1.0)
        den = np.sqrt(v + optim.eps) if eps_inside else np.sqrt(v) + optim.eps
        u = -lr * m / den
        if not coupled:
            u = u - (lr if decay_lr_scaled else 1.0) * wd * p
        out[k] = u
    return out


def optimizer_variants(optim: OptimConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(category, description, adamw_step0 keywords) of each single-setting change."""
    out = [("lr", f"learning rate of step 1 at step 0 (schedule offset by one: "
                  f"lr_at(1) = {lr_at(1, optim):.3g} instead of {lr_at(0, optim):.3g})",
            {"lr": lr_at(1, optim)}),
           ("lr", f"peak learning rate {optim.lr:g} at step 0 (no warm-up)", {"lr": optim.lr}),
           ("eps", "eps inside the square root (sqrt(v + eps))", {"eps_inside": True}),
           ("decay_coefficient", "decay not scaled by the learning rate (p -= wd * p)",
            {"decay_lr_scaled": False}),
           ("decay_coefficient", "L2 added to the gradient (Adam + L2, not AdamW)",
            {"coupled": True}),
           ("clipping", "clipping per tensor instead of by the global norm",
            {"clip": "tensor"}),
           ("clipping", "no gradient clipping", {"clip": "none"}),
           ("betas", "no bias correction of the second moment (beta2)", {"bias2": False}),
           ("betas", "no bias correction of the first moment (beta1)", {"bias1": False})]
    for policy in ("all", "none", "matrices"):
        if policy != optim.wd_mask:
            out.append(("decay_mask", f"weight-decay mask {policy!r} instead of "
                                      f"{optim.wd_mask!r}", {"decay": policy}))
    return out


def optimizer_rows(test_update: Arrays, test_grads: Arrays, ref_update: Arrays,
                   ref_grads: Arrays, init: Arrays, optim: OptimConfig, names: Sequence[str]
                   ) -> list[Row]:
    """Per tensor: JAX's update vs exact AdamW of JAX's own gradient; noise = the
    reference's update vs exact AdamW of its own gradient (DeepSpeed clips with
    ``norm + 1e-6``)."""
    ej = adamw_step0(test_grads, init, optim)
    er = adamw_step0(ref_grads, init, optim, clip_eps=1e-6)
    return [Row(n, rel_err(test_update[n], ej[n]), rel_err(ref_update[n], er[n]),
                OPT_MULTIPLE * rel_err(ref_update[n], er[n]) + OPT_ABS) for n in names]


def explain_optimizer(test_update: Arrays, test_grads: Arrays, init: Arrays,
                      optim: OptimConfig, rows: Sequence[Row]) -> dict[str, Any] | None:
    """The single setting whose change brings every tensor's update within its limit
    (fewest tensors left over, then smallest total error); None if none helps."""
    over = [r for r in rows if r.over]
    if not over:
        return None
    best = None
    for cat, what, kw in optimizer_variants(optim):
        u = adamw_step0(test_grads, init, optim, **kw)
        errs = {r.name: rel_err(test_update[r.name], u[r.name]) for r in rows}
        left = sum(errs[r.name] > r.limit for r in rows)
        score = (left, sum(min(e, 1e3) for e in errs.values()))
        if best is None or score < best[0]:
            best = (score, cat, what, errs)
    assert best is not None
    (left, _), cat, what, errs = best
    if left >= len(over):
        return None
    worst = max(over, key=lambda r: r.err)
    return {"setting": cat, "what": what, "tensors_over": [r.name for r in over],
            "left_over_with_it": left, "err_before": worst.err,
            "err_with_it": errs[worst.name], "tensor": worst.name}


# ----------------------------------------------------------------------------- diagnose


def _runs_of(runs: Mapping[str, Any], side: str, precision: str) -> list[Any]:
    return [r for r in runs.values() if getattr(r, "error", None) is None
            and r.spec.side == side and r.spec.precision == precision]


def _loss0(run: Any) -> float:
    return float(min(run.metrics, key=lambda r: r["step"])["loss"])


def _model_order(cfg: ExperimentConfig) -> list[str]:
    return list(param_shapes(cfg.model))


def _finding(category: str, headline: str, **detail: Any) -> dict[str, Any]:
    return {"category": category, "headline": headline, **detail}


def _fmt_row(what: str, r: Row, noise_word: str = "noise") -> str:
    return f"{what} (rel err {_g(r.err)}, {noise_word} {_g(r.noise)}, limit {_g(r.limit)})"


def _component(name: str) -> str:
    """``layer 0 self_attn`` -> ``self_attn``; ``final norm`` -> ``final_norm``."""
    parts = name.split()
    return parts[2] if parts[0] == "layer" else name.replace(" ", "_")


def fp32_ladder(cfg: ExperimentConfig, weights: Arrays, batch: np.ndarray,
                runs: Mapping[str, Any], truth: dict[str, Any]) -> dict[str, Any] | None:
    """The first fp32 divergence (data, forward, loss, gradient, optimizer, later
    steps) of the JAX fp32 run, or None when every step-0 quantity is within its noise."""
    jax_runs, ds_runs = _runs_of(runs, "jax", "fp32"), _runs_of(runs, "torch", "fp32")
    if not jax_runs or not ds_runs:
        return None
    j = jax_runs[0]
    for d in ds_runs:
        dd = data_divergence(j, d, cfg.zero.world_size)
        if dd is not None:
            return _data_finding(dd)
    fwd = compare_to_truth(truth["jax32"], truth["torch32"], truth["acts64"],
                           activation_names(cfg.model.num_hidden_layers), FWD_MULTIPLE,
                           FWD_ABS)
    truth["rows_forward_fp32"] = fwd
    r = first_over(fwd)
    if r is not None:
        return _finding(f"forward:{_component(r.name)}",
                        "first divergence: " + _fmt_row(f"{r.name} at step 0", r),
                        rows=[x.to_dict() for x in fwd])
    l64 = truth["loss64"]
    lj, ld = _loss0(j), max((_loss0(d) for d in ds_runs), key=lambda x: abs(x - l64))
    lrow = Row("loss", abs(lj - l64) / abs(l64), abs(ld - l64) / abs(l64), 0.0)
    lrow.limit = LOSS_MULTIPLE * lrow.noise + LOSS_ABS
    if lrow.over:
        return _finding("loss", "first divergence: " + _fmt_row(
            f"step-0 loss {lj:.6g} vs float64 {l64:.6g} (forward clean)", lrow),
            rows=[lrow.to_dict()])
    names = _model_order(cfg)
    g64 = truth["grads64"]
    if j.grads0 is not None and all(d.grads0 is not None for d in ds_runs):
        noise = {n: max(rel_err(d.grads0[n], g64[n]) for d in ds_runs) for n in names}
        grows = [Row(n, rel_err(j.grads0[n], g64[n]), noise[n],
                     GRAD_MULTIPLE * noise[n] + GRAD_ABS) for n in names]
        r = first_over(grows)
        if r is not None:
            return _finding(f"gradient:{r.name}", "first divergence: " + _fmt_row(
                f"step-0 gradient of {r.name} (forward and loss clean)", r),
                rows=[x.to_dict() for x in grows if x.over][:20])
    if j.params0 is not None and j.grads0 is not None:
        d = ds_runs[0]
        if d.params0 is not None and d.grads0 is not None:
            uj = {n: _f64(j.params0[n]) - _f64(weights[n]) for n in names}
            ud = {n: _f64(d.params0[n]) - _f64(weights[n]) for n in names}
            orows = optimizer_rows(uj, j.grads0, ud, d.grads0, weights, cfg.optim, names)
            r = first_over(orows)
            if r is not None:
                why = explain_optimizer(uj, j.grads0, weights, cfg.optim, orows)
                n_over = sum(x.over for x in orows)
                head = (f"first divergence: optimizer at step 0, {n_over} tensor(s) whose "
                        f"update is not exact AdamW of their own gradient, first "
                        + _fmt_row(r.name, r))
                if why is None:
                    return _finding("optimizer", head + "; no single setting explains it",
                                    rows=[x.to_dict() for x in orows if x.over][:20])
                return _finding(f"optimizer:{why['setting']}",
                                head + f"; explained by: {why['what']} (rel err with it "
                                f"{_g(why['err_with_it'])})", explanation=why,
                                rows=[x.to_dict() for x in orows if x.over][:20])
    return later_divergence(j, ds_runs, cfg.optim)


def later_divergence(j: Any, ds_runs: Sequence[Any], optim: OptimConfig
                     ) -> dict[str, Any] | None:
    """Step 0 clean: the first step whose logged LR or loss leaves DeepSpeed's."""
    steps = min(len(j.metrics), *(len(d.metrics) for d in ds_runs))
    sj = sorted(j.metrics, key=lambda r: r["step"])[:steps]
    for s, rec in enumerate(sj):
        if abs(float(rec["lr"]) - lr_at(s, optim)) > 1e-6 * max(lr_at(s, optim), 1e-30):
            return _finding("optimizer:lr", f"first divergence: logged learning rate at step "
                            f"{s} ({rec['lr']:.6g} vs lr_at = {lr_at(s, optim):.6g})")
    for s in range(steps):
        lj = float(sj[s]["loss"])
        rels = [abs(lj - float(sorted(d.metrics, key=lambda r: r["step"])[s]["loss"]))
                / abs(float(sorted(d.metrics, key=lambda r: r["step"])[s]["loss"]))
                for d in ds_runs]
        if min(rels) > LATER_LOSS_REL:
            return _finding("optimizer:after_step0", (
                f"first divergence: loss at step {s} (rel diff {_g(min(rels))}, limit "
                f"{_g(LATER_LOSS_REL)}) with step 0 clean (data, forward, loss, gradients, "
                "update): something only later steps use: betas / optimizer state, "
                "schedule"), step=s)
    return None


def bf16_row(name: str, err: float, floor: float, scale: float) -> Row:
    """bf16: JAX's distance to the reference against ``BF16_ACT_MULTIPLE`` x the floor
    (two faithful bf16 implementations apart) plus ``BF16_ACT_SCALE_FRACTION`` x the
    quantity's bf16 scale (the reference's distance from float64)."""
    return Row(name, err, floor,
               L.BF16_ACT_MULTIPLE * floor + L.BF16_ACT_SCALE_FRACTION * scale)


def bf16_forward_rows(truth: Mapping[str, Any], names: Sequence[str]) -> list[Row]:
    """Per activation: rel_err(jax bf16, torch bf16) against the Hugging Face bf16 vs
    torch bf16 floor."""
    j, t, h, f = truth["jax16"], truth["torch16"], truth["hf16"], truth["acts64"]
    return [bf16_row(n, rel_err(j[n], t[n]), rel_err(h[n], t[n]), rel_err(t[n], f[n]))
            for n in names]


def _get(c: Any, field: str) -> Any:
    return c.get(field) if isinstance(c, Mapping) else getattr(c, field, None)


def _failed_check(checks: Sequence[Any], key: str) -> Any:
    return next((c for c in checks if _get(c, "key") == key and not _get(c, "passed")), None)


def bf16_ladder(cfg: ExperimentConfig, weights: Arrays, batch: np.ndarray,
                runs: Mapping[str, Any], truth: dict[str, Any], checks: Sequence[Any] = ()
                ) -> dict[str, Any] | None:
    """The first bf16 quantity (data, forward activations, step-0 loss, gradients) where
    JAX bf16 is further from the reference bf16 than two faithful bf16 implementations
    are from each other (see :func:`bf16_row`)."""
    jax_runs, ds_runs = _runs_of(runs, "jax", "bf16"), _runs_of(runs, "torch", "bf16")
    if not jax_runs or not ds_runs:
        return None
    j = jax_runs[0]
    for d in ds_runs:
        dd = data_divergence(j, d, cfg.zero.world_size)
        if dd is not None:
            return _data_finding(dd, "bf16 ")
    fwd = bf16_forward_rows(truth, activation_names(cfg.model.num_hidden_layers))
    truth["rows_forward_bf16"] = fwd
    r = first_over(fwd)
    if r is not None:
        return _finding("bf16:forward", "first divergence (bf16): " + _fmt_row(
            f"{r.name} at step 0, jax bf16 vs torch bf16", r, "floor"),
            rows=[x.to_dict() for x in fwd])
    l64, lj = truth["loss64"], _loss0(j)
    ds_l = [_loss0(d) for d in ds_runs]
    floor = abs(truth["hf16_loss"] - truth["torch16_loss"]) / abs(truth["torch16_loss"])
    floor = max([floor] + [abs(a - b) / abs(b) for a in ds_l for b in ds_l])
    lrow = bf16_row("loss", max(abs(lj - ld) / abs(ld) for ld in ds_l), floor,
                    max(abs(ld - l64) / abs(l64) for ld in ds_l))
    if lrow.over:
        return _finding("bf16:loss", "first divergence (bf16): " + _fmt_row(
            f"step-0 loss {lj:.6g} vs deepspeed bf16 {ds_l[0]:.6g} (forward within its "
            "floor)", lrow, "floor"), rows=[lrow.to_dict()])
    lfn = _failed_check(checks, "bf16.loss_fn")
    if lfn is not None:
        return _finding("bf16:loss", (
            "first divergence (bf16): the loss function: on torch bf16's logits JAX's d loss"
            f" / d logits is {_g(_get(lfn, 'value'))} from float64 (limit "
            f"{_g(_get(lfn, 'limit'))}, torch's {_g(_get(lfn, 'noise'))}): log-softmax "
            "or loss reduction not in fp32? (forward within its floor)"))
    acc = _failed_check(checks, "bf16.accum")
    if acc is not None:
        dt = _get(acc, "detail") or {}
        return _finding("bf16:gradients", (
            f"first divergence (bf16): gradient accumulation: over {dt.get('micro_steps')} "
            f"micro-steps JAX's bf16 gradient moves {_g(_get(acc, 'value'))}x as far as "
            "torch's with fp32 accumulation (median tensor; limit "
            f"{_g(_get(acc, 'limit'))}; worst {dt.get('worst_tensor')} "
            f"{_g(dt.get('worst_ratio', math.nan))}x): micro-step gradients summed in "
            "bf16? (forward and step-0 loss within their floors)"), **dt)
    g64, names = truth["grads64"], _model_order(cfg)
    d = ds_runs[0]
    if j.grads0 is not None and d.grads0 is not None:
        th, tt = truth["hf16_grads"], truth["torch16_grads"]
        grows = []
        for n in names:
            floor = max([rel_err(th[n], tt[n])] + [rel_err(a.grads0[n], b.grads0[n])
                                                    for a in ds_runs for b in ds_runs
                                                    if a is not b and a.grads0 is not None
                                                    and b.grads0 is not None])
            grows.append(bf16_row(n, rel_err(j.grads0[n], d.grads0[n]), floor,
                                  rel_err(d.grads0[n], g64[n])))
        truth["rows_gradients_bf16"] = grows
        r = first_over(grows)
        if r is not None:
            n_over = sum(x.over for x in grows)
            return _finding("bf16:gradients", "first divergence (bf16): " + _fmt_row(
                f"step-0 gradient of {r.name}, jax bf16 vs deepspeed bf16 ({n_over} of "
                f"{len(grows)} tensors over; forward and loss within their floors)", r,
                "floor"), rows=[x.to_dict() for x in grows if x.over][:20])
    return bf16_curve(j, ds_runs, _runs_of(runs, "torch", "fp32"))


def _rms(a: Sequence[float], b: Sequence[float]) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b, strict=True))
                     / max(len(a), 1))


def _losses(run: Any, n: int) -> list[float]:
    return [float(r["loss"]) for r in sorted(run.metrics, key=lambda r: r["step"])[:n]]


def bf16_curve(j: Any, ds16: Sequence[Any], ds32: Sequence[Any]) -> dict[str, Any] | None:
    """Step 0 within its floors: the bf16 loss curve over the first ``BF16_CURVE_STEPS``
    steps, RMS |jax bf16 - deepspeed bf16| against BF16_ACT_MULTIPLE x the RMS gap
    between two DeepSpeed bf16 stages (where run) plus BF16_ACT_SCALE_FRACTION x the bf16 scale, the
    RMS gap between DeepSpeed bf16 and fp32 of the same stage."""
    pairs = [(d, next((f for f in ds32 if f.spec.zero_stage == d.spec.zero_stage), None))
             for d in ds16]
    pairs = [(d, f) for d, f in pairs if f is not None]
    if not pairs:
        return None
    n = min([len(j.metrics), BF16_CURVE_STEPS]
            + [min(len(d.metrics), len(f.metrics)) for d, f in pairs])
    lj = _losses(j, n)
    floor = max([0.0] + [_rms(_losses(a, n), _losses(b, n)) for a in ds16 for b in ds16
                         if a is not b])
    rows = [bf16_row(f"loss curve over steps 0-{n - 1} vs {d.spec.label}",
                     _rms(lj, _losses(d, n)), floor, _rms(_losses(d, n), _losses(f, n)))
            for d, f in pairs]
    r = first_over(rows)
    if r is None:
        return None
    return _finding("bf16:loss", "first divergence (bf16): " + _fmt_row(
        r.name + " (RMS gap; step-0 activations, loss and gradients within their floors)",
        r, "floor").replace("rel err", "RMS gap"), rows=[x.to_dict() for x in rows])


def _data_finding(dd: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    where = f"step {dd['step']}"
    if "part" in dd:
        where += (f", part {dd['part']} (micro-step {dd['micro_step']}, rank "
                  f"{dd['rank']}; {dd['parts_differing']} part(s) differ)")
    return _finding("data", f"first divergence: {prefix}batch rows at {where}: "
                    f"{dd['test']} vs {dd['ref']} batch fingerprints differ", **dd)


class Truth(dict):
    """The in-process pieces, each computed on first use: ``loss64``/``grads64`` (float64
    loss and gradient of the step-0 batch) and the activations ``acts64``,
    ``torch32``/``torch16``, ``jax32``/``jax16`` on its inputs."""

    def __init__(self, cfg: ExperimentConfig, weights: Arrays, batch: np.ndarray) -> None:
        super().__init__()
        self.cfg, self.weights, self.batch = cfg, weights, np.asarray(batch)
        # micro-batches of the in-process bf16 floor: as many as a DeepSpeed rank makes
        self.num_micro = max(1, cfg.grad_accum_steps(cfg.zero.world_size))

    def __missing__(self, key: str) -> Any:
        cfg, w, tokens = self.cfg, self.weights, self.batch[:, :-1]
        if key in ("loss64", "grads64"):
            self["loss64"], self["grads64"] = float64_truth(cfg, w, self.batch)
        elif key == "acts64":
            self[key] = torch_activations(cfg, w, tokens, "fp64")
        elif key in ("torch32", "torch16"):
            self[key] = torch_activations(cfg, w, tokens, "fp32" if key == "torch32" else "bf16")
        elif key in ("jax32", "jax16"):
            self[key] = jax_activations(cfg, w, tokens, "fp32" if key == "jax32" else "bf16")
        elif key == "hf16":
            self[key] = hf_activations(cfg, w, tokens, "bf16")
        elif key in ("torch16_grads", "hf16_grads"):
            m = self.num_micro
            lt, gt = bf16_loss_and_grads(cfg, w, self.batch, m, "torch")
            lh, gh = bf16_loss_and_grads(cfg, w, self.batch, m, "hf")
            self["torch16_loss"], self["torch16_grads"] = lt, gt
            self["hf16_loss"], self["hf16_grads"] = lh, gh
        elif key in ("torch16_loss", "hf16_loss"):
            self["torch16_grads"]
        else:
            raise KeyError(key)
        return self[key]


def compute_truth(cfg: ExperimentConfig, weights: Arrays, batch: np.ndarray,
                  precisions: Sequence[str] = ()) -> Truth:
    """A :class:`Truth` for the step-0 batch; ``precisions`` are computed at once."""
    truth = Truth(cfg, weights, batch)
    for key in ["loss64", "acts64"] + [k for p, ks in (("fp32", ("torch32", "jax32")),
                                                       ("bf16", ("torch16", "jax16")))
                                       if p in precisions for k in ks]:
        truth[key]
    return truth


def diagnose(cfg: ExperimentConfig, weights: Arrays, batch: np.ndarray,
             runs: Mapping[str, Any], checks: Sequence[Any], truth: Truth | None = None
             ) -> dict[str, Any]:
    """Where the JAX side first leaves its noise (see the module docstring).

    Args: the run's config, the initial HF-named weights, the step-0 global batch
    (G, T+1), the harness's runs by label (objects with ``spec``, ``metrics``,
    ``grads0``, ``params0``, ``error``) and its checks (dicts or objects with
    ``passed``); ``truth`` a :class:`Truth` of ``batch`` already (partly) computed.
    Returns ``{"headline", "category", ...}``; ``category`` is None when nothing is over
    its noise."""
    precisions = sorted({r.spec.precision for r in runs.values()
                         if getattr(r, "error", None) is None})
    failed = [c for c in checks if not _get(c, "passed")]
    truth = truth if truth is not None else Truth(cfg, weights, batch)
    found = None
    try:
        if "fp32" in precisions:
            found = fp32_ladder(cfg, weights, batch, runs, truth)
        if found is None and "bf16" in precisions:
            found = bf16_ladder(cfg, weights, batch, runs, truth, checks)
    except Exception as e:  # noqa: BLE001 - a diagnosis must never sink the run
        return {"headline": f"diagnosis failed: {type(e).__name__}: {e}", "category": None}
    summary = {k: [r.to_dict() for r in dict.get(truth, k)] for k in (
        "rows_forward_fp32", "rows_forward_bf16", "rows_gradients_bf16") if k in truth.keys()}
    if found is None:
        head = ("no divergence found: every step-0 quantity is within its noise"
                + (f", although {len(failed)} check(s) failed (see them)" if failed else ""))
        return {"headline": head, "category": None, **summary}
    return {**summary, **found}
