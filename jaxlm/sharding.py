"""Logical axis names -> mesh axes: the one place that knows about the device mesh.

The model names logical axes only (``embed``, ``heads``, ``act_batch``, ...). The rules
table of ``MeshConfig.rules`` (defaults in :data:`lmspec.config.DEFAULT_RULES`) maps
each name to mesh axes (``data``, ``fsdp``, ``tensor``), a list of them, or ``None``.
Mesh axes of size 1 are left out of the resulting ``PartitionSpec`` (they partition
nothing), so a spec reads as the real layout on that mesh.

Parameters: :func:`param_partition_specs` reads each ``nnx.Param``'s ``out_sharding``
metadata and checks, before anything is compiled, that every sharded dimension divides
the product of its mesh axes (the error names the parameter, the dimension and the
axis). Activations: :func:`constrain` is called by the model and applies
``jax.lax.with_sharding_constraint`` only inside :func:`activation_sharding`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmspec.config import MESH_AXES, ConfigError, MeshConfig

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping[str, Any]] | None] = (
    contextvars.ContextVar("jaxlm_activation_sharding", default=None)
)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices).

    Raises ``ConfigError`` when the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _rule_axes(name: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise ConfigError(f"mesh.rules: no rule for logical axis {name!r}; known: {list(rules)}")
    value = rules[name]
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, Any],
                    axis_sizes: Mapping[str, int], *, what: str = "tensor",
                    shape: Sequence[int] | None = None, strict: bool = True
                    ) -> PartitionSpec:
    """``PartitionSpec`` for a tensor whose dimensions have logical ``names``.

    With ``shape`` given, a dimension that does not divide its mesh axes is an error
    (``strict``) or left unsharded (activations of odd sizes, ``strict=False``).
    A mesh axis may partition at most one dimension of a tensor.
    """
    entries: list[Any] = []
    used: dict[str, str | None] = {}
    for dim, name in enumerate(names):
        axes = tuple(a for a in _rule_axes(name, rules) if axis_sizes[a] > 1)
        for a in axes:
            if a in used:
                raise ConfigError(
                    f"mesh.rules: {what} maps logical axes {used[a]!r} and {name!r} to the "
                    f"same mesh axis {a!r}; a mesh axis can shard one dimension only"
                )
            used[a] = name
        if axes and shape is not None:
            n = math.prod(axis_sizes[a] for a in axes)
            if shape[dim] % n:
                if strict:
                    detail = " * ".join(f"{a}={axis_sizes[a]}" for a in axes)
                    raise ConfigError(
                        f"{what}: dimension {dim} ({name!r}, size {shape[dim]}) is not "
                        f"divisible by mesh axis {detail} (rule {name!r} -> "
                        f"{list(axes)}); change the mesh sizes or mesh.rules.{name}"
                    )
                axes = ()
                for a in list(used):
                    if used[a] == name:
                        del used[a]
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return {a: int(mesh.shape[a]) for a in mesh.axis_names}


def path_name(path: Sequence[Any]) -> str:
    """``('layers', 'attn', 'q_dhq')`` -> ``'layers.attn.q_dhq'``."""
    return ".".join(str(p) for p in path)


def param_partition_specs(state: nnx.State, rules: Mapping[str, Any],
                          axis_sizes: Mapping[str, int]) -> dict[str, PartitionSpec]:
    """Flat ``{param path: PartitionSpec}`` for every parameter of an (abstract) state
    whose Variables carry ``out_sharding`` logical names. Validates divisibility."""
    out: dict[str, PartitionSpec] = {}
    for path, var in nnx.to_flat_state(state):
        name = path_name(path)
        names = var.get_metadata().get("out_sharding")
        shape = tuple(var.shape if hasattr(var, "shape") else var[...].shape)
        if names is None:
            names = (None,) * len(shape)
        if len(names) != len(shape):
            raise AssertionError(f"{name}: logical names {names} for shape {shape}")
        out[name] = logical_to_spec(names, rules, axis_sizes, what=f"parameter {name!r}",
                                    shape=shape)
    return out


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any]) -> nnx.State:
    """A pytree like ``nnx.pure(state)`` holding a ``NamedSharding`` per parameter."""
    specs = param_partition_specs(state, rules, mesh_sizes(mesh))
    flat = [(path, NamedSharding(mesh, specs[path_name(path)]))
            for path, _ in nnx.to_flat_state(state)]
    return nnx.to_pure_dict(nnx.from_flat_state(flat))


def activation_spec(names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    return logical_to_spec(names, rules, mesh_sizes(mesh), what="activation", shape=shape,
                           strict=False)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation to the sharding its logical ``names`` map to (no-op
    outside :func:`activation_sharding`)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    spec = activation_spec(names, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(active[0], spec))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, Any]) -> Iterator[None]:
    """While tracing inside this context, :func:`constrain` shards activations."""
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def spec_to_json(spec: PartitionSpec) -> list[Any]:
    """A JSON-able form of a PartitionSpec (for golden files)."""
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any], shape: Sequence[int],
                   names: Sequence[str | None]) -> NamedSharding:
    """Sharding of an input batch; the batch dimension must divide its mesh axes."""
    spec = logical_to_spec(names, rules, mesh_sizes(mesh), what="batch", shape=shape)
    return NamedSharding(mesh, spec)


def host_array(x: jax.Array) -> np.ndarray:
    """A fully addressable or replicated array as numpy (single process)."""
    return np.asarray(jax.device_get(x))
