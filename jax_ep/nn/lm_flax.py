"""The demo's MoE language model in Flax NNX (sizes in LMConfig)."""

from __future__ import annotations

import math
from typing import Callable

import jax
from jax.sharding import Mesh

from jax_ep.nn._extra import require
from jax_ep.nn.flax import MoE
from jax_ep.nn.lm_config import LMConfig, sum_block_aux
from jax_ep.nn.moe_math import MoESpec

nnx = require("flax.nnx", "jax_ep.nn.lm_flax")


class Block(nnx.Module):
    """x + attention(norm(x)), then x + MoE(norm(x)); returns (x, the MoE's aux dict)."""

    def __init__(self, cfg: LMConfig, mesh: Mesh, rngs: nnx.Rngs):
        d = cfg.d_model
        self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(cfg.heads, d, use_bias=False, decode=False,
                                           keep_rngs=False, rngs=rngs)
        self.moe_norm = nnx.RMSNorm(d, rngs=rngs)
        self.moe = MoE(d, cfg.ffn, cfg.experts, cfg.top_k, mesh=mesh, rngs=rngs,
                       **cfg.moe_kwargs())

    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict]:
        x = x + self.attn(self.attn_norm(x), mask=mask)
        y, aux = self.moe(self.moe_norm(x), return_aux=True)
        return x + y, aux


class LM(nnx.Module):
    """tokens [B, S] int32 -> (logits [B, S, vocab] f32, aux): aux = {"aux_loss": mean
    load-balancing loss over the blocks, "num_dropped": slots dropped for capacity, summed}."""

    def __init__(self, cfg: LMConfig, mesh: Mesh, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg, mesh, rngs) for _ in range(cfg.layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.head = (None if cfg.tie_embeddings else
                     nnx.Linear(cfg.d_model, cfg.vocab, use_bias=False, rngs=rngs))

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict]:
        x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        auxes = []
        for block in self.blocks:
            x, block_aux = block(x, mask)
            auxes.append(block_aux)
        x = self.norm(x)
        if self.head is None:  # embeddings have unit scale: 1/sqrt(d) keeps logits O(1)
            logits = self.embed.attend(x) / math.sqrt(self.cfg.d_model)
        else:
            logits = self.head(x)
        return logits, sum_block_aux(auxes)


def build(cfg: LMConfig, mesh: Mesh, seed: int) -> tuple[object, Callable, MoESpec]:
    """(trainable params pytree, apply(params, tokens) -> (logits, aux), the MoE layers' spec)."""
    model = LM(cfg, mesh, nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(params, tokens):
        return nnx.merge(graphdef, params, rest)(tokens)

    return params, apply, model.blocks[0].moe.spec
