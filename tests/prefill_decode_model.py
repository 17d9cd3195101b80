"""A small MoE language model that serves the way real ones do: the prompt goes through a
normal-layout EP group (prefill, many tokens per rank), then a decode loop generates one token
per sequence per step through a low-latency group (the padded layout), both groups alive in one
process. Used by tests/test_prefill_decode.py on CPU and on the GPU.

Each layer mixes a token with the mean of its sequence so far (a running sum per layer is the
decode cache, as a KV cache is for attention), then adds a top-k MoE of GELU experts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_ep


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    vocab: int = 64
    hidden: int = 128
    ffn: int = 256
    num_experts: int = 16
    top_k: int = 4
    layers: int = 2
    batch: int = 8        # sequences, sharded over the EP axis
    prompt: int = 12      # prompt tokens per sequence
    steps: int = 6        # generated tokens per sequence


def init_params(spec: ModelSpec, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def normal(*shape, scale):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    h, f, e = spec.hidden, spec.ffn, spec.num_experts
    return {
        "embed": normal(spec.vocab, h, scale=1.0),
        "unembed": normal(h, spec.vocab, scale=h ** -0.5),
        "layers": [{"router": normal(h, e, scale=h ** -0.5),
                    "w_in": normal(e, h, f, scale=h ** -0.5),
                    "w_out": normal(e, f, h, scale=f ** -0.5)}
                   for _ in range(spec.layers)],
    }


def groups_for(mesh: Mesh, spec: ModelSpec, backend: str):
    """(prefill group: normal layout, decode group: low-latency) over the mesh's EP axis."""
    n = mesh.shape["expert"]
    per_rank = spec.batch // n
    common = dict(num_experts=spec.num_experts, top_k=spec.top_k, hidden_size=spec.hidden,
                  dtype="float32", num_sms=8)
    prefill = jax_ep.EPGroup(mesh, "expert", jax_ep.EPConfig(
        max_tokens=per_rank * spec.prompt, **common), backend=backend)
    decode = jax_ep.EPGroup(mesh, "expert", jax_ep.EPConfig(
        max_tokens=per_rank, padded_layout=True, **common), backend=backend)
    return prefill, decode


def _moe(group: jax_ep.EPGroup, layout: str, h, layer: dict, spec: ModelSpec):
    """h [T, H] -> the MoE's output [T, H] (one rank's tokens)."""
    probs = jax.nn.softmax(h @ layer["router"])
    weights, idx = jax.lax.top_k(probs, spec.top_k)
    d = jax_ep.dispatch(group, h, idx.astype(jnp.int32), weights, layout=layout)
    el = spec.num_experts // group.num_ranks
    first = jax.lax.axis_index("expert") * el
    w_in = jax.lax.dynamic_slice_in_dim(layer["w_in"], first, el)
    w_out = jax.lax.dynamic_slice_in_dim(layer["w_out"], first, el)
    if layout == "padded":  # rows [E_local, N * M, H]: one batched matmul per expert
        y = jnp.einsum("emf,efh->emh", jax.nn.gelu(jnp.einsum("emh,ehf->emf", d.x, w_in)), w_out)
    else:  # rows [C, H], expert-major
        y = jax.lax.ragged_dot(jax.nn.gelu(jax.lax.ragged_dot(d.x, w_in, d.group_sizes)), w_out,
                               d.group_sizes)
    return jax_ep.combine(group, y, d.handle, weights=d.weights)


def _prefill_rank(prefill: jax_ep.EPGroup, spec: ModelSpec, params, prompt):
    """prompt [B_r, S] -> (logits of the last position [B_r, V], per-layer sums [L, B_r, H])."""
    b, s = prompt.shape
    h = params["embed"][prompt]                                     # [B_r, S, H]
    sums = []
    for layer in params["layers"]:
        running = jnp.cumsum(h, axis=1)
        h = h + running / jnp.arange(1, s + 1, dtype=h.dtype)[None, :, None]
        sums.append(running[:, -1])
        h = h + _moe(prefill, "normal", h.reshape(b * s, -1), layer, spec).reshape(h.shape)
    return h[:, -1] @ params["unembed"], jnp.stack(sums)


def _decode_step(decode: jax_ep.EPGroup, spec: ModelSpec, params, carry, _):
    """One generated token per sequence: (token [B_r], sums [L, B_r, H], count) -> next."""
    token, sums, count = carry
    h = params["embed"][token]                                      # [B_r, H]
    new_sums = []
    for i, layer in enumerate(params["layers"]):
        s = sums[i] + h
        new_sums.append(s)
        h = h + s / count
        h = h + _moe(decode, "padded", h, layer, spec)
    logits = h @ params["unembed"]
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (nxt, jnp.stack(new_sums), count + 1), (nxt, logits)


def generate(mesh: Mesh, spec: ModelSpec, params, prompts, prefill, decode):
    """prompts [B, S] int32 -> (tokens [B, steps], logits [B, steps, V]): greedy decoding."""

    def per_rank(params, prompts):
        logits, sums = _prefill_rank(prefill, spec, params, prompts)
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        count = jnp.asarray(spec.prompt + 1, jnp.float32)
        step = lambda c, x: _decode_step(decode, spec, params, c, x)  # noqa: E731
        _, (tokens, step_logits) = jax.lax.scan(step, (first, sums, count), None,
                                                length=spec.steps - 1)
        tokens = jnp.concatenate([first[None], tokens]).T
        step_logits = jnp.concatenate([logits[None], step_logits]).transpose(1, 0, 2)
        return tokens, step_logits

    fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=(P(), P("expert")),
                               out_specs=(P("expert"), P("expert"))))
    with jax.default_matmul_precision("highest"):
        return jax.tree.map(np.asarray, fn(params, jnp.asarray(prompts)))


def prompts_for(spec: ModelSpec, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, spec.vocab, size=(spec.batch, spec.prompt)).astype(np.int32)
