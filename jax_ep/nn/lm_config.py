"""Sizes of the demo's small MoE language model (shared by its Flax and Equinox versions)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Token embeddings + learned positions, `layers` pre-norm blocks of causal self-attention
    and an MoE (SwiGLU experts), a final RMSNorm and the output head (tied to the embeddings
    or not). All blocks' aux losses are averaged."""

    vocab: int = 64
    seq_len: int = 64
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    ffn: int = 128
    experts: int = 8
    top_k: int = 2
    shared_ffn: int = 0
    router: str = "softmax"
    capacity_factor: float | None = None
    tie_embeddings: bool = False
    backend: str = "auto"
    expert_gemm: str = "auto"

    def moe_kwargs(self) -> dict:
        """Keyword arguments of the MoE layers (both frameworks)."""
        return dict(shared_ffn=self.shared_ffn, router=self.router,
                    capacity_factor=self.capacity_factor, backend=self.backend,
                    expert_gemm=self.expert_gemm)


def sum_block_aux(auxes: list[dict]) -> dict:
    """The model's aux from its MoE blocks' aux dicts: the load-balancing loss averaged over the
    blocks (so its scale does not grow with depth), dropped slots summed."""
    return {"aux_loss": sum(a["aux_loss"] for a in auxes) / len(auxes),
            "num_dropped": sum(a["num_dropped"] for a in auxes)}
