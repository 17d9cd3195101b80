"""The demo's MoE language model in Equinox (sizes in LMConfig)."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jax_ep.nn._extra import require
from jax_ep.nn.equinox import MoE
from jax_ep.nn.lm_config import LMConfig, sum_block_aux
from jax_ep.nn.moe_math import MoESpec

eqx = require("equinox", "jax_ep.nn.lm_equinox")


def _per_token(f: Callable, x: jax.Array) -> jax.Array:
    """Equinox norms act on one [d] vector: map f over [B, S, d]."""
    return jax.vmap(jax.vmap(f))(x)


class Block(eqx.Module):
    """x + attention(norm(x)), then x + MoE(norm(x)); returns (x, aux_loss)."""

    attn_norm: eqx.nn.RMSNorm
    attn: eqx.nn.MultiheadAttention
    moe_norm: eqx.nn.RMSNorm
    moe: MoE

    def __init__(self, cfg: LMConfig, mesh: Mesh, key: jax.Array):
        k_attn, k_moe = jax.random.split(key)
        self.attn_norm = eqx.nn.RMSNorm(cfg.d_model)
        self.attn = eqx.nn.MultiheadAttention(cfg.heads, cfg.d_model, key=k_attn)
        self.moe_norm = eqx.nn.RMSNorm(cfg.d_model)
        self.moe = MoE(cfg.d_model, cfg.ffn, cfg.experts, cfg.top_k, mesh=mesh, key=k_moe,
                       **cfg.moe_kwargs())

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
        h = _per_token(self.attn_norm, x)
        x = x + jax.vmap(lambda s: self.attn(s, s, s, mask=mask))(h)
        y, aux = self.moe(_per_token(self.moe_norm, x), return_aux=True)
        return x + y, aux


class LM(eqx.Module):
    """tokens [B, S] int32 -> (logits [B, S, vocab] f32, aux): aux = {"aux_loss": mean
    load-balancing loss over the blocks, "num_dropped": slots dropped for capacity, summed}."""

    embed: jax.Array
    pos: jax.Array
    blocks: list
    norm: eqx.nn.RMSNorm
    head: jax.Array | None
    d_model: int = eqx.field(static=True)

    def __init__(self, cfg: LMConfig, mesh: Mesh, key: jax.Array):
        k_embed, k_pos, k_head, *k_blocks = jax.random.split(key, 3 + cfg.layers)
        self.embed = jax.random.normal(k_embed, (cfg.vocab, cfg.d_model))
        self.pos = 0.02 * jax.random.normal(k_pos, (cfg.seq_len, cfg.d_model))
        self.blocks = [Block(cfg, mesh, k) for k in k_blocks]
        self.norm = eqx.nn.RMSNorm(cfg.d_model)
        self.head = (None if cfg.tie_embeddings else
                     jax.random.normal(k_head, (cfg.d_model, cfg.vocab)) / math.sqrt(cfg.d_model))
        self.d_model = cfg.d_model

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict]:
        seq = tokens.shape[1]
        x = self.embed[tokens] + self.pos[:seq]
        mask = jnp.tril(jnp.ones((seq, seq), bool))
        auxes = []
        for block in self.blocks:
            x, block_aux = block(x, mask)
            auxes.append(block_aux)
        x = _per_token(self.norm, x)
        if self.head is None:  # embeddings have unit scale: 1/sqrt(d) keeps logits O(1)
            return x @ self.embed.T / math.sqrt(self.d_model), sum_block_aux(auxes)
        return x @ self.head, sum_block_aux(auxes)


def build(cfg: LMConfig, mesh: Mesh, seed: int) -> tuple[object, Callable, MoESpec]:
    """(trainable params pytree, apply(params, tokens) -> (logits, aux), the MoE layers' spec)."""
    model = LM(cfg, mesh, jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply(params, tokens):
        return eqx.combine(params, static)(tokens)

    return params, apply, model.blocks[0].moe.spec
