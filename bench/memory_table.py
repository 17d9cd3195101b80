"""The table of docs/memory.md: device memory per GPU of the cuda backend's buffers for common MoE
model sizes, from jax_ep.buffer_bytes (cuda/buffer_map.h's ComputeBufferMap; runs on CPU).

    python bench/memory_table.py            # print the table
    python bench/memory_table.py --write    # replace the table in docs/memory.md
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jax_ep import EPConfig, buffer_bytes
from jax_ep._cli import FlagParser

DOC = Path(__file__).resolve().parents[1] / "docs" / "memory.md"
BEGIN, END = "<!-- memory_table.py: begin -->", "<!-- memory_table.py: end -->"

# name, E, top_k, hidden (bf16 tokens)
MODELS = [
    ("Mixtral 8x7B", 8, 2, 4096),
    ("Qwen3-30B-A3B", 128, 8, 2048),
    ("Qwen3-235B-A22B", 128, 8, 4096),
    ("DeepSeek-V3", 256, 8, 7168),
]
# (N ranks, hosts, max_tokens, capacity_factor, padded_layout): training / prefill chunks and a
# decode batch with the padded layout.
SETTINGS = [
    (8, 1, 4096, None, False),
    (8, 1, 4096, 1.25, False),
    (8, 1, 128, None, True),
    (64, 8, 4096, None, False),
    (64, 8, 4096, 1.25, False),
]


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def rows() -> list[list[str]]:
    out = []
    for name, e, k, h in MODELS:
        for n, hosts, t, cf, padded in SETTINGS:
            if e % n:
                continue
            cfg = EPConfig(num_experts=e, top_k=k, max_tokens=t, hidden_size=h,
                           dtype="bfloat16", capacity_factor=cf, padded_layout=padded)
            normal = buffer_bytes(dataclasses.replace(cfg, padded_layout=False), n,
                                  num_hosts=hosts)
            total = buffer_bytes(cfg, n, num_hosts=hosts)
            backend = "cuda" if hosts == 1 else f"hierarchical ({hosts} hosts)"
            out.append([name, f"{e} / {k} / {h}", str(n), backend, str(t),
                        "dropless" if cf is None else f"{cf:g}", gib(normal),
                        gib(total - normal) if padded else "-", gib(total)])
    return out


def markdown() -> str:
    head = ["model", "E / k / H", "N", "backend", "max_tokens", "capacity_factor",
            "normal layout (GiB)", "padded layout (GiB)", "total per GPU (GiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = FlagParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="replace the table in docs/memory.md")
    args = p.parse_args()
    table = markdown()
    if not args.write:
        print(table, end="")
        return
    text = DOC.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + table + text[stop:])
    print(f"wrote the table into {DOC}")


if __name__ == "__main__":
    main()
