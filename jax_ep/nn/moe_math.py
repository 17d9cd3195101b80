"""The MoE layer's math, once, for every framework: router, gated (SwiGLU) experts, aux and
z losses, load statistics, the EP body that runs inside shard_map, and the dense fallback
without a mesh.

Parameters are a plain dict of arrays (names and shapes in `param_shapes`), so the Flax NNX and
Equinox layers only hold them and call `moe_forward`. Notation: T tokens, H hidden, F expert
FFN width, E experts, k top-k, N ranks on the EP axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep.api import combine, dispatch
from jax_ep.config import EPConfig, dtype_name
from jax_ep.group import BACKENDS, EPGroup
from jax_ep.nn import expert_gemm
from jax_ep.nn.expert_gemm import ragged_swiglu  # noqa: F401  (the portable path, public here too)

ROUTERS = ("softmax", "sigmoid")
EXPERT_PARAMS = ("w_gate", "w_up", "w_down")
EXPERT_BIASES = ("b_gate", "b_up", "b_down")
SHARED_PARAMS = ("shared_gate", "shared_up", "shared_down")
SHARED_BIASES = ("shared_b_gate", "shared_b_up", "shared_b_down")
ROUTER_BIAS = "router_bias"
CORRECTION_BIAS = "correction_bias"
# Parameters sharded over the expert axis (their first dimension is E); the rest are replicated.
EXPERT_SHARDED = EXPERT_PARAMS + EXPERT_BIASES
# Not trained by gradient descent: updated from the load statistics (correction_bias_update).
NON_TRAINABLE = (CORRECTION_BIAS,)

# The gate activation of the gated experts, act(x @ w_gate) * (x @ w_up): names, or a callable.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,                                           # SwiGLU (default)
    "gelu": functools.partial(jax.nn.gelu, approximate=False),     # GeGLU, exact erf (torch's)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,                                           # ReGLU
    "sigmoid": jax.nn.sigmoid,                                     # GLU
}

# jax.named_scope names (in profiles / HLO op names) and jax.ad_checkpoint.checkpoint_name
# names (for remat policies such as jax.checkpoint_policies.save_only_these_names):
ROUTER_NAME = "jax_ep.router"         # scope only
DISPATCH_NAME = "jax_ep.dispatch"     # checkpoint_name: every array of the Dispatched
EXPERTS_NAME = "jax_ep.experts"       # checkpoint_name: the experts' output rows [C, H]
COMBINE_NAME = "jax_ep.combine"       # checkpoint_name: the combined tokens [T, H]
SHARED_NAME = "jax_ep.shared_expert"  # scope only
CHECKPOINT_NAMES = (DISPATCH_NAME, EXPERTS_NAME, COMBINE_NAME)

# The keys of the aux dict (moe_forward(..., return_aux=True)).
AUX_KEYS = ("loss", "aux_loss", "z_loss", "expert_load", "num_dropped", "num_invalid")

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
_f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Static description of one MoE layer (hashable: it is a static field of the layers).

    Attributes:
      hidden: H, the width of the tokens.
      ffn: F, the hidden width of each routed expert's gated MLP.
      num_experts: E.
      top_k: k, experts per token.
      shared_ffn: width of an always-on shared gated expert; 0 = none.
      router: "softmax" (probabilities over experts) or "sigmoid" (independent scores,
        DeepSeek-V3).
      renormalize: divide each token's top-k weights by their sum.
      mesh: the mesh the layer runs over; None runs every expert locally (dense fallback).
      expert_axis: the mesh axis the experts are spread over (E % N == 0).
      token_axes: mesh axes the tokens are sharded over (must include expert_axis); None = all
        axes of the mesh, e.g. ('data', 'expert').
      capacity_factor: EPConfig.capacity_factor (None = dropless).
      max_tokens: EPConfig.max_tokens (tokens per rank); None = the tokens per rank of the call
        (the EPGroup is then made at the first call instead of with the layer).
      backend: EPGroup backend, "auto" picks cuda on GPUs.
      dtype: compute dtype of the experts and of what dispatch moves.
      expert_gemm: how the experts' grouped matmuls run (jax_ep.nn.expert_gemm.IMPLS): "auto"
        ("ragged" off GPUs, "capacity" on GPUs), "ragged" (lax.ragged_dot), "capacity"
        (batched matmuls over a per-expert capacity layout) (docs/nn.md, "Expert matmuls").
      activation: gate activation of the experts, act(x @ w_gate) * (x @ w_up): a name in
        ACTIVATIONS ("silu" = SwiGLU, "gelu" = GeGLU, "gelu_tanh", "relu", "sigmoid") or a
        callable (hashable; a module-level function).
      use_bias: biases in the experts (b_gate [E, F], b_up [E, F], b_down [E, H]) and in the
        shared expert (shared_b_gate [S], shared_b_up [S], shared_b_down [H]).
      router_bias: a trainable bias [E] added to the router logits.
      correction_bias: DeepSeek-V3's aux-loss-free balancing: a non-trainable bias [E] added
        to the scores for choosing the top-k experts only (the weights stay the unbiased
        scores); update it from the load with `correction_bias_update`.
      num_groups, topk_groups: grouped (node-limited) top-k: the E experts form num_groups
        groups of E/num_groups; each token keeps the topk_groups groups with the largest sum of
        their two best scores, then takes its top-k within them (DeepSeek-V3's n_group /
        topk_group). topk_groups None = all groups (plain top-k).
      routed_scaling_factor: multiplies the top-k weights (after renormalisation).
      aux_loss_coef, z_loss_coef: weights of the load-balancing loss and of the router z-loss
        in aux["loss"] (the aux dict of return_aux=True).
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
    expert_gemm: str = "auto"
    activation: Any = "silu"
    use_bias: bool = False
    router_bias: bool = False
    correction_bias: bool = False
    num_groups: int = 1
    topk_groups: int | None = None
    routed_scaling_factor: float = 1.0
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn", "num_experts", "top_k", "num_groups"):
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
        if self.expert_gemm not in expert_gemm.IMPLS:
            raise ValueError(f"MoE: expert_gemm must be one of {expert_gemm.IMPLS}, got "
                             f"{self.expert_gemm!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"MoE: backend must be one of {BACKENDS}, got {self.backend!r}")
        if not callable(self.activation) and self.activation not in ACTIVATIONS:
            raise ValueError(f"MoE: activation must be one of {tuple(ACTIVATIONS)} or a "
                             f"callable, got {self.activation!r}")
        self._check_groups()
        for name in ("aux_loss_coef", "z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MoE: {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"MoE: routed_scaling_factor must be > 0, got "
                             f"{self.routed_scaling_factor!r}")
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

    def _check_groups(self) -> None:
        g, kept = self.num_groups, self.topk_groups
        if self.num_experts % g:
            raise ValueError(f"MoE: num_experts={self.num_experts} is not divisible by "
                             f"num_groups={g}")
        if kept is None:
            return
        if not isinstance(kept, (int, np.integer)) or not 1 <= kept <= g:
            raise ValueError(f"MoE: topk_groups must be an int in [1, num_groups={g}], got "
                             f"{kept!r}")
        if self.top_k > kept * (self.num_experts // g):
            raise ValueError(f"MoE: top_k={self.top_k} exceeds the {kept * self.num_experts // g}"
                             f" experts of the topk_groups={kept} groups a token may use; "
                             f"raise topk_groups")

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

    @property
    def activation_fn(self) -> Callable[[jax.Array], jax.Array]:
        """The gate activation as a function."""
        return self.activation if callable(self.activation) else ACTIVATIONS[self.activation]

    @property
    def group_limited(self) -> bool:
        """True when tokens may only use topk_groups < num_groups groups of experts."""
        return self.topk_groups is not None and self.topk_groups < self.num_groups


# --- parameters ----------------------------------------------------------------------------------

def param_shapes(spec: MoESpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter (the optional ones only when their option is on)."""
    e, h, f, s = spec.num_experts, spec.hidden, spec.ffn, spec.shared_ffn
    shapes = {"router": (h, e), "w_gate": (e, h, f), "w_up": (e, h, f), "w_down": (e, f, h)}
    if s:
        shapes.update(shared_gate=(h, s), shared_up=(h, s), shared_down=(s, h))
    if spec.router_bias:
        shapes[ROUTER_BIAS] = (e,)
    if spec.correction_bias:
        shapes[CORRECTION_BIAS] = (e,)
    if spec.use_bias:
        shapes.update(b_gate=(e, f), b_up=(e, f), b_down=(e, h))
        if s:
            shapes.update(shared_b_gate=(s,), shared_b_up=(s,), shared_b_down=(h,))
    return shapes


def param_specs(spec: MoESpec) -> dict[str, P]:
    """Name -> PartitionSpec over spec.mesh: expert weights and biases split on E, the rest
    replicated."""
    return {name: P(spec.expert_axis) if name in EXPERT_SHARDED else P()
            for name in param_shapes(spec)}


def param_family(name: str) -> str:
    """The initializer family of a parameter: "router", "expert", "shared" or "bias"."""
    if name == "router":
        return "router"
    if name in EXPERT_PARAMS:
        return "expert"
    if name in SHARED_PARAMS:
        return "shared"
    return "bias"


def _default_init(name: str, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    if param_family(name) == "bias":
        return jnp.zeros(shape, dtype)
    return jax.random.normal(key, shape, dtype) / math.sqrt(shape[-2])


def init_params(key: jax.Array, spec: MoESpec, dtype: Any = jnp.float32,
                inits: Mapping[str, Initializer | None] | None = None) -> dict[str, jax.Array]:
    """Initial parameters, placed with `param_specs` when the spec has a mesh.

    Default: weights Normal(0, 1/fan_in) (fan_in = the second-to-last dimension), biases zero.
    `inits` overrides by family ("router", "expert", "shared", "bias") or by parameter name
    (which wins), each a jax.nn.initializers-style `init(key, shape, dtype)`; expert weights
    have shape [E, H, F] / [E, F, H] (for variance_scaling pass batch_axis=0). The
    correction bias always starts at zero, in float32.
    """
    inits = dict(inits or {})
    unknown = set(inits) - {"router", "expert", "shared", "bias"} - set(param_shapes(spec))
    if unknown:
        raise ValueError(f"MoE: initializers for unknown parameters or families "
                         f"{sorted(unknown)}; families are router, expert, shared, bias and "
                         f"the parameters {sorted(param_shapes(spec))}")
    shapes = param_shapes(spec)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    specs = param_specs(spec)
    params = {}
    for name, shape in shapes.items():
        init = inits.get(name) or inits.get(param_family(name))
        if name == CORRECTION_BIAS:
            value = jnp.zeros(shape, _f32)
        elif init is None:
            value = _default_init(name, keys[name], shape, dtype)
        else:
            value = jnp.asarray(init(keys[name], shape, dtype), dtype)
        if value.shape != shape:
            raise ValueError(f"MoE: the initializer of {name} returned shape {value.shape}, "
                             f"expected {shape}")
        if spec.mesh is not None:
            value = jax.device_put(value, NamedSharding(spec.mesh, specs[name]))
        params[name] = value
    return params


def correction_bias_update(bias: jax.Array, expert_load: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's aux-loss-free balancing step: b_e += rate * sign(mean load - load_e), so
    overloaded experts become less likely to be chosen and underloaded ones more. expert_load
    is aux["expert_load"] [E] (routed slots per expert); rate is DeepSeek's gamma (1e-3)."""
    load = jnp.asarray(expert_load, _f32)
    return (bias.astype(_f32) + rate * jnp.sign(jnp.mean(load) - load)).astype(bias.dtype)


# --- router, experts, losses ---------------------------------------------------------------------

class Routing(NamedTuple):
    """scores [T, E] f32 (probabilities that sum to 1 per token, for the aux loss),
    weights [T, k] f32 and experts [T, k] int32 of each token's top-k, logits [T, E] f32
    (for the z-loss)."""

    scores: jax.Array
    weights: jax.Array
    experts: jax.Array
    logits: jax.Array | None = None


def _limit_groups(choice: jax.Array, spec: MoESpec) -> jax.Array:
    """choice [T, E] with every expert outside the token's topk_groups best groups at -inf;
    a group's score is the sum of its two best choice scores (its best, with one expert)."""
    t, e = choice.shape
    per_group = e // spec.num_groups
    grouped = choice.reshape(t, spec.num_groups, per_group)
    group_scores = jnp.sum(jax.lax.top_k(grouped, min(2, per_group))[0], axis=-1)  # [T, G]
    _, kept = jax.lax.top_k(group_scores, spec.topk_groups)
    keep = jnp.zeros((t, spec.num_groups), bool).at[jnp.arange(t)[:, None], kept].set(True)
    return jnp.where(jnp.repeat(keep, per_group, axis=1), choice, -jnp.inf)


def route(x: jax.Array, w_router: jax.Array, spec: MoESpec, *,
          router_bias: jax.Array | None = None,
          correction_bias: jax.Array | None = None) -> Routing:
    """x [T, H], w_router [H, E] -> Routing. Logits in float32 so top-k is stable in bf16.

    Experts are chosen by top-k of the gates (softmax or sigmoid of the logits), plus the
    correction bias when given, limited to the best groups when spec.topk_groups is set; the
    weights are the chosen experts' (unbiased) gates, renormalised and scaled by
    spec.routed_scaling_factor.
    """
    logits = x.astype(_f32) @ w_router.astype(_f32)
    if router_bias is not None:
        logits = logits + router_bias.astype(_f32)
    if spec.router == "softmax":
        gates = jax.nn.softmax(logits, axis=-1)
        scores = gates
    else:
        gates = jax.nn.sigmoid(logits)
        scores = gates / jnp.sum(gates, axis=-1, keepdims=True)
    if correction_bias is None and not spec.group_limited:
        weights, experts = jax.lax.top_k(gates, spec.top_k)
    else:
        choice = jax.lax.stop_gradient(gates)
        if correction_bias is not None:
            choice = choice + jax.lax.stop_gradient(correction_bias.astype(_f32))
        if spec.group_limited:
            choice = _limit_groups(choice, spec)
        _, experts = jax.lax.top_k(choice, spec.top_k)
        weights = jnp.take_along_axis(gates, experts, axis=-1)
    if spec.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return Routing(scores=scores, weights=weights, experts=experts.astype(jnp.int32),
                   logits=logits)


def _gated(gate: jax.Array, up: jax.Array, activation: Callable) -> jax.Array:
    return activation(gate) * up


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
           activation: Callable = jax.nn.silu, b_gate: jax.Array | None = None,
           b_up: jax.Array | None = None, b_down: jax.Array | None = None) -> jax.Array:
    """Dense gated MLP: x [T, H], w_gate/w_up [H, F], w_down [F, H] (biases [F], [F], [H])
    -> [T, H]: (act(x @ w_gate + b_gate) * (x @ w_up + b_up)) @ w_down + b_down."""
    gate, up = x @ w_gate, x @ w_up
    if b_gate is not None:
        gate, up = gate + b_gate, up + b_up
    out = _gated(gate, up, activation) @ w_down
    return out if b_down is None else out + b_down


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


def z_loss_sum(logits: jax.Array) -> jax.Array:
    """Sum over tokens of logsumexp(logits)^2 (ST-MoE's router z-loss, before the mean)."""
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2)


def _stats(routing: Routing, spec: MoESpec, num_tokens: int, reduce: Callable,
           num_dropped: jax.Array, num_invalid: jax.Array) -> dict[str, jax.Array]:
    """The statistics over all num_tokens tokens of the call; `reduce` sums the per-shard
    partial sums over the token shards (a psum, or the identity without a mesh)."""
    load = jnp.zeros(spec.num_experts, jnp.int32).at[routing.experts.reshape(-1)].add(1)
    score_sums = jnp.sum(routing.scores, axis=0)
    load, score_sums, z_sum, num_dropped, num_invalid = reduce(
        (load, score_sums, z_loss_sum(routing.logits), num_dropped, num_invalid))
    return {"aux_loss": aux_loss(load.astype(_f32), score_sums, num_tokens, spec.top_k),
            "z_loss": z_sum / num_tokens, "expert_load": load,
            "num_dropped": num_dropped, "num_invalid": num_invalid}


# --- the two bodies: expert parallel (per rank) and dense (no mesh) ------------------------------

def _cast(params: dict[str, jax.Array], names, dtype) -> list[jax.Array]:
    return [params[n].astype(dtype) for n in names]


def _biases(params: dict[str, jax.Array], names, dtype) -> dict[str, jax.Array]:
    """{b_gate, b_up, b_down: ...} from params[names] (empty when the layer has no biases)."""
    if names[0] not in params:
        return {}
    return dict(zip(("b_gate", "b_up", "b_down"), _cast(params, names, dtype)))


def _route(x: jax.Array, params: dict[str, jax.Array], spec: MoESpec) -> Routing:
    with jax.named_scope(ROUTER_NAME):
        return route(x, params["router"], spec, router_bias=params.get(ROUTER_BIAS),
                     correction_bias=params.get(CORRECTION_BIAS))


def _shared(x: jax.Array, params: dict[str, jax.Array], spec: MoESpec) -> jax.Array:
    if not spec.shared_ffn:
        return jnp.zeros_like(x)
    with jax.named_scope(SHARED_NAME):
        return swiglu(x, *_cast(params, SHARED_PARAMS, x.dtype), activation=spec.activation_fn,
                      **_biases(params, SHARED_BIASES, x.dtype))


def dense_body(x: jax.Array, params: dict[str, jax.Array], spec: MoESpec):
    """The fallback without a mesh: every expert on every token, weighted by the routing
    (exact, and E/k times the FLOPs of the routed layer). x [T, H] -> (y [T, H], stats) with
    stats the aux dict's entries but "loss" (num_dropped and num_invalid are 0)."""
    routing = _route(x, params, spec)
    gate_of = jnp.zeros((x.shape[0], spec.num_experts), _f32)
    gate_of = gate_of.at[jnp.arange(x.shape[0])[:, None], routing.experts].add(routing.weights)
    with jax.named_scope(EXPERTS_NAME):
        w_gate, w_up, w_down = _cast(params, EXPERT_PARAMS, x.dtype)
        b = _biases(params, EXPERT_BIASES, x.dtype)
        gate = jnp.einsum("th,ehf->tef", x, w_gate)
        up = jnp.einsum("th,ehf->tef", x, w_up)
        if b:
            gate, up = gate + b["b_gate"], up + b["b_up"]
        out = jnp.einsum("tef,efh->teh", _gated(gate, up, spec.activation_fn), w_down)
        if b:
            out = out + b["b_down"]
        y = jnp.einsum("te,teh->th", gate_of, out.astype(_f32)).astype(x.dtype)
    zero = jnp.zeros((), jnp.int32)
    stats = _stats(routing, spec, x.shape[0], lambda v: v, zero, zero)
    return y + _shared(x, params, spec), stats


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
    """The EPGroup a call with tokens_per_rank tokens per rank uses (made once per distinct
    EPConfig and kept; with spec.max_tokens set, every call shares the same one)."""
    max_tokens = spec.max_tokens or tokens_per_rank
    if tokens_per_rank > max_tokens:
        raise ValueError(f"MoE: {tokens_per_rank} tokens per rank exceed max_tokens="
                         f"{spec.max_tokens}; raise max_tokens or shard tokens over more devices")
    config = EPConfig(num_experts=spec.num_experts, top_k=spec.top_k, max_tokens=max_tokens,
                      hidden_size=spec.hidden, dtype=spec.dtype,
                      capacity_factor=spec.capacity_factor)
    return _group(spec.mesh, spec.expert_axis, config, spec.backend)


def build_group(spec: MoESpec) -> EPGroup | None:
    """The layers call this when they are constructed: with a mesh and max_tokens it makes (or
    finds) the EPGroup every call will use, so a bad backend or configuration fails here with
    the backend's error rather than inside the first training step. None when the group can't
    be made yet (no mesh, or max_tokens unknown: then the first call makes it)."""
    if spec.mesh is None or spec.max_tokens is None:
        return None
    return group_for(spec, spec.max_tokens)


def ep_body(x: jax.Array, params: dict[str, jax.Array], spec: MoESpec):
    """One rank's share, inside shard_map over spec.token_axes: x [T, H] local tokens; expert
    weights [E/N, ...] (or [E, ...], then sliced). Returns (y [T, H], stats over all tokens:
    the aux dict's entries but "loss", the same on every rank)."""
    group = group_for(spec, x.shape[0])
    routing = _route(x, params, spec)
    with jax.named_scope(DISPATCH_NAME):
        d = dispatch(group, x, routing.experts, routing.weights)
        d = checkpoint_name(d, DISPATCH_NAME)
    with jax.named_scope(EXPERTS_NAME):
        w_gate, w_up, w_down = (_local_experts(w, spec)
                                for w in _cast(params, EXPERT_PARAMS, x.dtype))
        biases = {n: _local_experts(b, spec)
                  for n, b in _biases(params, EXPERT_BIASES, x.dtype).items()}
        rows = expert_gemm.grouped_swiglu(
            d.x, d.group_sizes, w_gate, w_up, w_down, activation=spec.activation_fn, **biases,
            impl=spec.expert_gemm, expected_rows=x.shape[0] * spec.top_k,
            platform=spec.mesh.devices.flat[0].platform)
        rows = checkpoint_name(rows, EXPERTS_NAME)
    with jax.named_scope(COMBINE_NAME):
        y = combine(group, rows, d.handle, weights=d.weights)
        y = checkpoint_name(y, COMBINE_NAME)
    total = x.shape[0] * spec.token_shards
    stats = _stats(routing, spec, total, lambda v: jax.lax.psum(v, spec.token_axes),
                   d.num_dropped, d.num_invalid)
    return y + _shared(x, params, spec), stats


# --- entry point ---------------------------------------------------------------------------------

def _manual_axes() -> frozenset:
    return frozenset(jax.sharding.get_abstract_mesh().manual_axes)


def _forward(spec: MoESpec, params: dict[str, jax.Array], tokens: jax.Array):
    if spec.mesh is None:
        return dense_body(tokens, params, spec)
    manual = _manual_axes()
    if spec.expert_axis in manual:
        missing = [a for a in spec.token_axes if a not in manual]
        if missing:
            raise ValueError(f"MoE: called inside shard_map over {sorted(manual)}, but the "
                             f"token axes {missing} are not manual there; shard_map over all "
                             f"of {spec.token_axes} or call the layer outside shard_map")
        return ep_body(tokens, params, spec)
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
    return sharded(tokens, params)


def moe_forward(spec: MoESpec, params: dict[str, jax.Array], x: jax.Array, *,
                return_aux: bool = False):
    """The MoE layer: x [..., H] -> (y [..., H] in spec.dtype, aux_loss [] float32), or with
    return_aux=True (y, aux) where aux is a dict over all tokens of the call:

      loss:        aux_loss_coef * aux_loss + z_loss_coef * z_loss (add it to the training
                   loss; 0 with both coefficients at their default 0)
      aux_loss:    [] f32 the load-balancing loss E * sum_e f_e * p_e (1.0 when uniform)
      z_loss:      [] f32 the router z-loss, mean over tokens of logsumexp(logits)^2
      expert_load: [E] int32 routed slots per expert (before capacity drops), over every token
                   shard (with a 'data' axis: over all data slices)
      num_dropped: [] int32 slots dropped for capacity, summed over all ranks
      num_invalid: [] int32 invalid expert ids seen by dispatch, summed over all ranks

    Without a mesh: the dense fallback. With one: expert-parallel dispatch / gated experts /
    combine inside jax.shard_map over the mesh, tokens (x flattened to [T, H]) split over
    spec.token_axes. Called inside a shard_map that already binds the token axes, it runs the
    per-rank body directly on the local tokens (expert weights sharded or whole).
    """
    if x.shape[-1] != spec.hidden:
        raise ValueError(f"MoE: x has width {x.shape[-1]}, the layer was built for "
                         f"hidden={spec.hidden}")
    lead = x.shape[:-1]
    tokens = x.reshape(-1, spec.hidden).astype(spec.dtype)
    with jax.named_scope("jax_ep.moe"):
        y, stats = _forward(spec, params, tokens)
    y = y.reshape(*lead, spec.hidden)
    if not return_aux:
        return y, stats["aux_loss"]
    loss = spec.aux_loss_coef * stats["aux_loss"] + spec.z_loss_coef * stats["z_loss"]
    return y, {"loss": loss, **stats}
