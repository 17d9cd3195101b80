"""jax_ep.buffer_bytes: what a group's cuda buffers take per GPU, answered before the group exists
(on CPU too: the compiled extension evaluates cuda/buffer_map.h in every build). Checked against a
byte count written independently from the region list documented in cuda/buffer_map.h and
docs/memory.md, and docs/memory.md's table against bench/memory_table.py."""

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest

import jax_ep
from jax_ep import EPConfig

ROOT = Path(__file__).resolve().parents[1]
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def _up(n: int) -> int:
    return -(-n // 256) * 256


def documented_bytes(E, k, T, H, N, dtype="bfloat16", capacity=None, padded=False):
    """The regions of docs/memory.md, each rounded up to 256 bytes, for the cuda backend."""
    rb = H * ITEMSIZE[dtype]
    tk = T * k
    c = N * tk if capacity is None else min(capacity, N * tk)
    s = max(c, tk)
    chunks = -(-tk // 256)
    normal = [256,                      # SignalArea (168 bytes, aligned to 128)
              4 * 8 * E,                # counts [8 ranks][E]
              4 * c, 4 * c,             # row_primary, row_src
              4 * s, 4 * tk,            # row_f32, slot_f32
              s * rb,                   # staging
              4 * tk,                   # local_rank
              4 * chunks * E, 4 * chunks * E, 4 * E]
    total = sum(_up(b) for b in normal)
    if padded:
        rows = E * T  # (local expert, source) pairs x max_tokens
        scale_cols = -(-H // 128)
        extra = [256, 4 * E]  # PaddedSignal, expert counters
        extra += 2 * [8 * E, 4 * E, 4 * rows, 4 * rows * scale_cols, rows * rb,
                      8 * 8, 4 * rows, 4 * rows, rows * rb]
        total += sum(_up(b) for b in extra)
    return total


SHAPES = [  # E, k, T, H, N
    (8, 2, 16, 32, 4),
    (8, 2, 4096, 4096, 8),
    (256, 8, 4096, 7168, 8),
    (128, 8, 128, 2048, 4),
    (64, 6, 1000, 1040, 2),   # nothing a multiple of 256
    (4096, 32, 3, 8, 8),
]


@pytest.mark.parametrize("E,k,T,H,N", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
def test_matches_the_documented_regions(E, k, T, H, N, padded):
    cfg = EPConfig(num_experts=E, top_k=k, max_tokens=T, hidden_size=H, padded_layout=padded)
    assert jax_ep.buffer_bytes(cfg, N) == documented_bytes(E, k, T, H, N, padded=padded)


def test_grows_with_tokens_hidden_ranks_and_dtype():
    base = dict(num_experts=64, top_k=4, max_tokens=512, hidden_size=1024)
    b = jax_ep.buffer_bytes(EPConfig(**base), 8)
    # staging holds S = N * T * k rows of H * itemsize bytes: it dominates and scales with each.
    staging = 8 * 512 * 4 * 1024 * 2
    assert staging < b < 1.02 * staging
    assert jax_ep.buffer_bytes(EPConfig(**{**base, "hidden_size": 2048}), 8) - b == staging
    assert jax_ep.buffer_bytes(EPConfig(**{**base, "dtype": "float32"}), 8) - b == staging
    assert jax_ep.buffer_bytes(EPConfig(**base), 4) < b
    twice = jax_ep.buffer_bytes(EPConfig(**{**base, "max_tokens": 1024}), 8)
    assert math.isclose(twice / b, 2, rel_tol=0.01)
    # A capacity below the dropless N * T * k shrinks the receive side (not below T * k rows).
    assert (jax_ep.buffer_bytes(EPConfig(**base, capacity_factor=1.0), 8)
            == documented_bytes(64, 4, 512, 1024, 8, capacity=512 * 4))
    assert (jax_ep.buffer_bytes(EPConfig(**base, capacity=100), 8)
            == documented_bytes(64, 4, 512, 1024, 8, capacity=100))


def test_padded_layout_adds_four_row_blocks_of_E_times_max_tokens():
    cfg = EPConfig(num_experts=32, top_k=8, max_tokens=64, hidden_size=4096)
    extra = (jax_ep.buffer_bytes(dataclasses.replace(cfg, padded_layout=True), 8)
             - jax_ep.buffer_bytes(cfg, 8))
    rows = 32 * 64
    # 2 halves x (dispatch rows + combine rows), plus weights, scales, flags, counters.
    assert 4 * rows * 4096 * 2 < extra < 4 * rows * 4096 * 2 * 1.03
    assert extra == (documented_bytes(32, 8, 64, 4096, 8, padded=True)
                     - documented_bytes(32, 8, 64, 4096, 8))


def test_hierarchical_leg_is_sized_for_every_hosts_tokens():
    cfg = EPConfig(num_experts=256, top_k=8, max_tokens=256, hidden_size=7168)
    # 16 ranks on 2 hosts: the intra-host leg holds 2 * T tokens per rank, C of the 16 ranks,
    # over a group of the 8 GPUs of a host.
    got = jax_ep.buffer_bytes(cfg, 16, num_hosts=2)
    assert got == documented_bytes(256, 8, 2 * 256, 7168, 8, capacity=16 * 256 * 8)
    # The padded layout's regions are a flat group's: E (local expert, source) blocks of
    # M = max_tokens rows per rank, whatever the hosts (each rank forwards 2 sources' tokens).
    padded = jax_ep.buffer_bytes(dataclasses.replace(cfg, padded_layout=True), 16, num_hosts=2)
    assert padded - got == (documented_bytes(256, 8, 256, 7168, 8, padded=True)
                            - documented_bytes(256, 8, 256, 7168, 8))


def test_bad_arguments_are_value_errors():
    cfg = EPConfig(num_experts=8, top_k=2, max_tokens=16, hidden_size=32)
    with pytest.raises(ValueError, match="max_tokens"):
        jax_ep.buffer_bytes(EPConfig(num_experts=8, top_k=2), 4)
    with pytest.raises(ValueError, match="divisible"):
        jax_ep.buffer_bytes(cfg, 3)
    with pytest.raises(ValueError, match="at most 8"):
        jax_ep.buffer_bytes(EPConfig(num_experts=16, top_k=2, max_tokens=16, hidden_size=32), 16)
    with pytest.raises(ValueError, match="num_ranks"):
        jax_ep.buffer_bytes(cfg, 0)


def test_docs_table_is_the_scripts_output():
    spec = importlib.util.spec_from_file_location("memory_table", ROOT / "bench" / "memory_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    doc = (ROOT / "docs" / "memory.md").read_text()
    assert table.markdown() in doc, "regenerate: python bench/memory_table.py --write"
