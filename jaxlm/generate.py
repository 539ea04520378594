"""Sampling from a trained checkpoint: greedy (temperature 0) or temperature sampling.

No KV cache: each new token reruns the causal forward over a fixed-length buffer (one
compilation; positions after the current one cannot influence it), which is plenty for
the small models this project trains on a CPU.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.checkpoint import CHECKPOINT_SUBDIR, Checkpoints
from jaxlm.model import Llama
from lmspec.config import ExperimentConfig, from_dict, load_config
from lmspec.errors import UserError, UserFileNotFoundError

HELP = "see `jaxlm generate --help`"


def _locate(path: str | os.PathLike) -> tuple[Path, int | None]:
    """(run out_dir, checkpoint step or None for the latest) from a run or step folder."""
    p = Path(path)
    if not p.exists():
        raise UserFileNotFoundError(f"checkpoint not found: {p}")
    if (p / CHECKPOINT_SUBDIR).is_dir():
        return p, None
    if p.name.isdigit() and p.parent.name == CHECKPOINT_SUBDIR:
        return p.parent.parent, int(p.name)
    if p.name == CHECKPOINT_SUBDIR:
        return p.parent, None
    raise UserError(
        f"{p}: expected a run directory holding {CHECKPOINT_SUBDIR}/ or a folder "
        f"{CHECKPOINT_SUBDIR}/<step>"
    )


def load_params(path: str | os.PathLike) -> tuple[ExperimentConfig, dict, int]:
    """Config, fp32 params (pure dict, on one device) and step of a checkpoint."""
    out_dir, step = _locate(path)
    ckpts = Checkpoints(out_dir, keep=1, read_only=True)
    try:
        if step is None:
            step = ckpts.latest_step()
            if step is None:
                raise UserError(f"no complete checkpoint in {ckpts.directory}")
        elif step not in ckpts.all_steps():
            raise UserError(f"no complete checkpoint for step {step} in "
                                    f"{ckpts.directory}")
        todo = f"choose another checkpoint folder of {ckpts.directory}"
        if not ckpts.verify(step, todo):
            print(f"warning: {ckpts.step_dir(step)} has no checksums (older version): "
                  "not verified", file=sys.stderr)
        meta = ckpts.read_meta(step, todo)
        if "config" in meta:
            cfg = from_dict(meta["config"])
        else:
            cfg = load_config(out_dir / "config.yaml")
        # restore onto a single device: a one-device mesh of the same logical layout
        from jaxlm.trainer import build_setup

        one = from_dict(meta["config"], ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
                                         "zero.world_size=1", "train.micro_batch_size="
                                         f"{cfg.train.global_batch_size}"])
        setup = build_setup(one, [jax.devices()[0]])
        state, _ = ckpts.restore(step, setup.abstract_state)
    finally:
        ckpts.close()
    return cfg, state["params"], step


def check_sampling(*, max_new_tokens: int, temperature: float) -> None:
    """A UserError naming the flag for a negative token count, or a temperature that is
    negative, NaN or infinite (``softmax(logits / nan)`` samples garbage: NUL bytes)."""
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens={max_new_tokens} must be >= 0; {HELP}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature={temperature} must be a finite number >= 0 "
                        f"(0 = greedy); {HELP}")


def sample(cfg: ExperimentConfig, params: dict, prompt_ids: list[int], *,
           max_new_tokens: int, temperature: float, seed: int,
           eos_id: int | None = None, num_ids: int | None = None,
           cache: bool = True) -> list[int]:
    """Token ids after ``prompt_ids`` (fp32 forward). ``num_ids``: only ids below it are
    drawn (the tokenizer's vocabulary, when ``model.vocab_size`` is padded past it: an id
    the tokenizer cannot decode would end the command with an error). ``cache``: a
    key/value cache (prefill the prompt, then one token per step); False recomputes the
    whole prefix for every token (the reference the cache is tested against)."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature)
    if not prompt_ids:
        raise UserError(f"--prompt: the prompt encodes to no tokens; {HELP}")
    limit = cfg.model.max_position_embeddings
    total = len(prompt_ids) + max_new_tokens
    if total > limit:
        raise UserError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens={max_new_tokens} exceeds "
            f"model.max_position_embeddings={limit}"
        )
    num_ids = cfg.model.vocab_size if num_ids is None else min(num_ids, cfg.model.vocab_size)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(
        cfg.model, rngs=nnx.Rngs(0), scan_layers=cfg.train.scan_layers)))

    def pick(logits_v: jax.Array, key: jax.Array) -> jax.Array:
        logits_v = jnp.where(jnp.arange(logits_v.shape[0]) < num_ids, logits_v, -jnp.inf)
        if temperature == 0:
            return jnp.argmax(logits_v).astype(jnp.int32)
        return jax.random.categorical(key, logits_v / temperature).astype(jnp.int32)

    key = jax.random.key(seed)
    out: list[int] = []
    if cache:
        @jax.jit
        def step(params: dict, toks_1t: jax.Array, kv: Any, pos: jax.Array, key: jax.Array
                 ) -> tuple[jax.Array, Any]:
            logits_1tv, kv = nnx.merge(graphdef, params).decode(toks_1t, kv, pos)
            return pick(logits_1tv[0, -1], key), kv

        kv = nnx.merge(graphdef, params).init_cache(1, total)
        toks = jnp.asarray([prompt_ids], jnp.int32)  # prefill, then one token a step
        pos = 0
        for i in range(max_new_tokens):
            tok_j, kv = step(params, toks, kv, jnp.int32(pos), jax.random.fold_in(key, i))
            tok = int(tok_j)
            out.append(tok)
            if eos_id is not None and tok == eos_id:
                break
            pos += toks.shape[1]
            toks = jnp.asarray([[tok]], jnp.int32)
        return out

    @jax.jit
    def next_token(params: dict, buf_1t: jax.Array, pos: jax.Array, key: jax.Array
                   ) -> jax.Array:
        return pick(nnx.merge(graphdef, params)(buf_1t)[0, pos - 1], key)

    buf = np.zeros((1, total), np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids
    buf_j = jnp.asarray(buf)
    for i in range(max_new_tokens):
        pos = len(prompt_ids) + i
        tok = int(next_token(params, buf_j, jnp.int32(pos), jax.random.fold_in(key, i)))
        out.append(tok)
        buf_j = buf_j.at[0, pos].set(tok)
        if eos_id is not None and tok == eos_id:
            break
    return out


def generate_from_checkpoint(path: str | os.PathLike, prompt: str, *, max_new_tokens: int = 64,
                             temperature: float = 0.0, seed: int = 0) -> str:
    """Prompt + continuation as text, from a run directory or a checkpoint folder."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature)
    cfg, params, _ = load_params(path)
    from lmspec.data import Dataset

    tokenizer = Dataset.from_config(cfg, progress=False).tokenizer
    ids = tokenizer.encode(prompt)
    new = sample(cfg, params, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                 seed=seed, eos_id=getattr(tokenizer, "eos_id", None),
                 num_ids=tokenizer.vocab_size)
    return prompt + tokenizer.decode(new)
