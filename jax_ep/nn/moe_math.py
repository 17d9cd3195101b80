"""The MoE layer's math, once, for every framework: router, SwiGLU experts, aux loss, the EP
body that runs inside shard_map, and the dense fallback without a mesh.

Parameters are a plain dict of arrays (names and shapes in `param_shapes`), so the Flax NNX and
Equinox layers only hold them and call `moe_forward`. Notation: T tokens, H hidden, F expert
FFN width, E experts, k top-k, N ranks on the EP axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep.api import combine, dispatch
from jax_ep.config import EPConfig, dtype_name
from jax_ep.group import EPGroup

ROUTERS = ("softmax", "sigmoid")
EXPERT_PARAMS = ("w_gate", "w_up", "w_down")
SHARED_PARAMS = ("shared_gate", "shared_up", "shared_down")
_f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Static description of one MoE layer (hashable: it is a static field of the layers).

    Attributes:
      hidden: H, the width of the tokens.
      ffn: F, the hidden width of each routed expert's SwiGLU.
      num_experts: E.
      top_k: k, experts per token.
      shared_ffn: width of an always-on shared SwiGLU expert; 0 = none.
      router: "softmax" (probabilities over experts) or "sigmoid" (independent scores).
      renormalize: divide each token's top-k weights by their sum.
      mesh: the mesh the layer runs over; None runs every expert locally (dense fallback).
      expert_axis: the mesh axis the experts are spread over (E % N == 0).
      token_axes: mesh axes the tokens are sharded over (must include expert_axis); None = all
        axes of the mesh, e.g. ('data', 'expert').
      capacity_factor: EPConfig.capacity_factor (None = dropless).
      max_tokens: EPConfig.max_tokens (tokens per rank); None = the tokens per rank of the call.
      backend: EPGroup backend, "auto" picks cuda on GPUs.
      dtype: compute dtype of the experts and of what dispatch moves.
    """

    hidden: int
    ffn: int
    num_experts: int
    top_k: int
    shared_ffn: int = 0
    router: str = "softmax"
    renormalize: bool = True
    mesh: Mesh | None = None
    expert_axis: str = "expert"
    token_axes: tuple[str, ...] | None = None
    capacity_factor: float | None = None
    max_tokens: int | None = None
    backend: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"MoE: {name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoE: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.shared_ffn < 0:
            raise ValueError(f"MoE: shared_ffn must be >= 0 (0 = no shared expert), got "
                             f"{self.shared_ffn}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoE: router must be one of {ROUTERS}, got {self.router!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.mesh is None:
            return
        if self.expert_axis not in self.mesh.axis_names:
            raise ValueError(f"MoE: expert_axis {self.expert_axis!r} is not an axis of the mesh "
                             f"{tuple(self.mesh.axis_names)}")
        n = self.mesh.shape[self.expert_axis]
        if self.num_experts % n:
            raise ValueError(f"MoE: num_experts={self.num_experts} is not divisible by the {n} "
                             f"devices of axis {self.expert_axis!r}; use a multiple of {n}")
        axes = tuple(self.mesh.axis_names) if self.token_axes is None else tuple(self.token_axes)
        unknown = [a for a in axes if a not in self.mesh.axis_names]
        if unknown or self.expert_axis not in axes:
            raise ValueError(f"MoE: token_axes {axes} must be axes of the mesh "
                             f"{tuple(self.mesh.axis_names)} and include the expert axis "
                             f"{self.expert_axis!r} (each EP rank routes its own tokens)")
        object.__setattr__(self, "token_axes", axes)

    @property
    def num_ranks(self) -> int:
        """N: devices on the EP axis (1 without a mesh)."""
        return 1 if self.mesh is None else self.mesh.shape[self.expert_axis]

    @property
    def token_shards(self) -> int:
        """How many pieces the tokens are cut into (product of the token axes' sizes)."""
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in self.token_axes)


# --- parameters ----------------------------------------------------------------------------------

def param_shapes(spec: MoESpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter (the shared expert's only when shared_ffn > 0)."""
    e, h, f, s = spec.num_experts, spec.hidden, spec.ffn, spec.shared_ffn
    shapes = {"router": (h, e), "w_gate": (e, h, f), "w_up": (e, h, f), "w_down": (e, f, h)}
    if s:
        shapes.update(shared_gate=(h, s), shared_up=(h, s), shared_down=(s, h))
    return shapes


def param_specs(spec: MoESpec) -> dict[str, P]:
    """Name -> PartitionSpec over spec.mesh: expert weights split on E, the rest replicated."""
    return {name: P(spec.expert_axis) if name in EXPERT_PARAMS else P()
            for name in param_shapes(spec)}


def init_params(key: jax.Array, spec: MoESpec, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """Normal(0, 1/fan_in) weights, placed with `param_specs` when the spec has a mesh."""
    shapes = param_shapes(spec)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    params = {}
    for name, shape in shapes.items():
        fan_in = shape[-2]
        value = jax.random.normal(keys[name], shape, dtype) / math.sqrt(fan_in)
        if spec.mesh is not None:
            value = jax.device_put(value, NamedSharding(spec.mesh, param_specs(spec)[name]))
        params[name] = value
    return params


# --- router, experts, aux loss -------------------------------------------------------------------

class Routing(NamedTuple):
    """scores [T, E] f32 (probabilities that sum to 1 per token, for the aux loss),
    weights [T, k] f32 and experts [T, k] int32 of each token's top-k."""

    scores: jax.Array
    weights: jax.Array
    experts: jax.Array


def route(x: jax.Array, w_router: jax.Array, spec: MoESpec) -> Routing:
    """x [T, H], w_router [H, E] -> Routing. Logits in float32 so top-k is stable in bf16."""
    logits = x.astype(_f32) @ w_router.astype(_f32)
    if spec.router == "softmax":
        gates = jax.nn.softmax(logits, axis=-1)
        scores = gates
    else:
        gates = jax.nn.sigmoid(logits)
        scores = gates / jnp.sum(gates, axis=-1, keepdims=True)
    weights, experts = jax.lax.top_k(gates, spec.top_k)
    if spec.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(scores=scores, weights=weights, experts=experts.astype(jnp.int32))


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dense SwiGLU: x [T, H], w_gate/w_up [H, F], w_down [F, H] -> [T, H]."""
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def ragged_swiglu(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    """SwiGLU per expert over expert-major rows: rows [C, H], group_sizes [G], w_gate/w_up
    [G, H, F], w_down [G, F, H] -> [C, H] (rows past sum(group_sizes) come out zero)."""
    gate = jax.lax.ragged_dot(rows, w_gate, group_sizes)
    up = jax.lax.ragged_dot(rows, w_up, group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def load_stats(routing: Routing, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(slots per expert [E] f32, sum of scores per expert [E] f32) over this shard's tokens."""
    counts = jnp.zeros(num_experts, _f32).at[routing.experts.reshape(-1)].add(1.0)
    return counts, jnp.sum(routing.scores, axis=0)


def aux_loss(counts: jax.Array, score_sums: jax.Array, num_tokens: int, top_k: int) -> jax.Array:
    """Switch/GShard load-balancing loss E * sum_e f_e * p_e over all num_tokens tokens: f_e the
    fraction of routed slots that chose e (no gradient), p_e the mean score of e. 1.0 when both
    are uniform."""
    num_experts = counts.shape[0]
    f = jax.lax.stop_gradient(counts) / (num_tokens * top_k)
    p = score_sums / num_tokens
    return num_experts * jnp.sum(f * p)


# --- the two bodies: expert parallel (per rank) and dense (no mesh) ------------------------------

def _cast(params: dict[str, jax.Array], names, dtype) -> list[jax.Array]:
    return [params[n].astype(dtype) for n in names]


def _shared(x: jax.Array, params: dict[str, jax.Array], spec: MoESpec) -> jax.Array:
    if not spec.shared_ffn:
        return jnp.zeros_like(x)
    return swiglu(x, *_cast(params, SHARED_PARAMS, x.dtype))


def dense_body(x: jax.Array, params: dict[str, jax.Array], spec: MoESpec):
    """The fallback without a mesh: every expert on every token, weighted by the routing
    (exact, and E/k times the FLOPs of the routed layer). x [T, H] -> (y [T, H], aux [])."""
    routing = route(x, params["router"], spec)
    gate_of = jnp.zeros((x.shape[0], spec.num_experts), _f32)
    gate_of = gate_of.at[jnp.arange(x.shape[0])[:, None], routing.experts].add(routing.weights)
    w_gate, w_up, w_down = _cast(params, EXPERT_PARAMS, x.dtype)
    h = jax.nn.silu(jnp.einsum("th,ehf->tef", x, w_gate)) * jnp.einsum("th,ehf->tef", x, w_up)
    out = jnp.einsum("tef,efh->teh", h, w_down)
    y = jnp.einsum("te,teh->th", gate_of, out.astype(_f32)).astype(x.dtype)
    counts, score_sums = load_stats(routing, spec.num_experts)
    return y + _shared(x, params, spec), aux_loss(counts, score_sums, x.shape[0], spec.top_k)


def _local_experts(w: jax.Array, spec: MoESpec) -> jax.Array:
    """This rank's [E/N, ...] slice: as given when already sharded, else cut from the full [E]."""
    local = spec.num_experts // spec.num_ranks
    if w.shape[0] == local:
        return w
    if w.shape[0] != spec.num_experts:
        raise ValueError(f"MoE: expert weights have {w.shape[0]} experts on this rank; expected "
                         f"{local} (sharded over {spec.expert_axis!r}) or {spec.num_experts}")
    start = jax.lax.axis_index(spec.expert_axis) * local
    return jax.lax.dynamic_slice_in_dim(w, start, local, axis=0)


@functools.lru_cache(maxsize=None)
def _group(mesh: Mesh, axis: str, config: EPConfig, backend: str) -> EPGroup:
    """One EPGroup per (mesh, axis, config, backend), made on first use and kept: the cuda
    backend allocates its buffers once here."""
    return EPGroup(mesh, axis, config, backend)


def group_for(spec: MoESpec, tokens_per_rank: int) -> EPGroup:
    """The EPGroup a call with tokens_per_rank tokens per rank uses."""
    max_tokens = spec.max_tokens or tokens_per_rank
    if tokens_per_rank > max_tokens:
        raise ValueError(f"MoE: {tokens_per_rank} tokens per rank exceed max_tokens="
                         f"{spec.max_tokens}; raise max_tokens or shard tokens over more devices")
    config = EPConfig(num_experts=spec.num_experts, top_k=spec.top_k, max_tokens=max_tokens,
                      hidden_size=spec.hidden, dtype=spec.dtype,
                      capacity_factor=spec.capacity_factor)
    return _group(spec.mesh, spec.expert_axis, config, spec.backend)


def ep_body(x: jax.Array, params: dict[str, jax.Array], spec: MoESpec):
    """One rank's share, inside shard_map over spec.token_axes: x [T, H] local tokens; expert
    weights [E/N, ...] (or [E, ...], then sliced). Returns (y [T, H], aux [] over all tokens)."""
    group = group_for(spec, x.shape[0])
    routing = route(x, params["router"], spec)
    d = dispatch(group, x, routing.experts, routing.weights)
    w_gate, w_up, w_down = (_local_experts(w, spec)
                            for w in _cast(params, EXPERT_PARAMS, x.dtype))
    rows = ragged_swiglu(d.x, d.group_sizes, w_gate, w_up, w_down)
    y = combine(group, rows, d.handle, weights=d.weights)
    counts, score_sums = load_stats(routing, spec.num_experts)
    counts, score_sums = jax.lax.psum((counts, score_sums), spec.token_axes)
    total = x.shape[0] * spec.token_shards
    return y + _shared(x, params, spec), aux_loss(counts, score_sums, total, spec.top_k)


# --- entry point ---------------------------------------------------------------------------------

def _manual_axes() -> frozenset:
    return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def moe_forward(spec: MoESpec, params: dict[str, jax.Array], x: jax.Array):
    """The MoE layer: x [..., H] -> (y [..., H] in spec.dtype, aux_loss [] float32).

    Without a mesh: the dense fallback. With one: expert-parallel dispatch / SwiGLU experts /
    combine inside jax.shard_map over the mesh, tokens (x flattened to [T, H]) split over
    spec.token_axes. Called inside a shard_map that already binds the token axes, it runs the
    per-rank body directly on the local tokens (expert weights sharded or whole).
    """
    if x.shape[-1] != spec.hidden:
        raise ValueError(f"MoE: x has width {x.shape[-1]}, the layer was built for "
                         f"hidden={spec.hidden}")
    lead = x.shape[:-1]
    tokens = x.reshape(-1, spec.hidden).astype(spec.dtype)
    if spec.mesh is None:
        y, aux = dense_body(tokens, params, spec)
        return y.reshape(*lead, spec.hidden), aux
    manual = _manual_axes()
    if spec.expert_axis in manual:
        missing = [a for a in spec.token_axes if a not in manual]
        if missing:
            raise ValueError(f"MoE: called inside shard_map over {sorted(manual)}, but the "
                             f"token axes {missing} are not manual there; shard_map over all "
                             f"of {spec.token_axes} or call the layer outside shard_map")
        y, aux = ep_body(tokens, params, spec)
        return y.reshape(*lead, spec.hidden), aux
    if tokens.shape[0] % spec.token_shards:
        raise ValueError(f"MoE: {tokens.shape[0]} tokens do not split evenly over the "
                         f"{spec.token_shards} devices of the token axes {spec.token_axes}; "
                         f"use a batch * sequence length that is a multiple of it")
    token_spec = P(spec.token_axes)
    body: Callable = functools.partial(ep_body, spec=spec)
    sharded = jax.shard_map(
        lambda t, p: body(t, p), mesh=spec.mesh,
        in_specs=(token_spec, {n: s for n, s in param_specs(spec).items() if n in params}),
        out_specs=(token_spec, P()))
    y, aux = sharded(tokens, params)
    return y.reshape(*lead, spec.hidden), aux
