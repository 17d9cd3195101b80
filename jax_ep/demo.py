"""Trains a small MoE language model with expert parallelism over every device:

    python -m jax_ep.demo            # 8 emulated CPU devices when there is no GPU
    python -m jax_ep.demo --help     # the flags

The data are sequences from a few fixed sparse Markov chains (jax_ep/nn/synthetic.py): the loss
falls from ln(vocab) towards the chains' entropy, which the demo prints as the floor. The MoE
layers (jax_ep.nn, Flax NNX by default) dispatch tokens to experts with jax_ep over the mesh's
'expert' axis; tokens are split over ('data', 'expert'). Writes a loss curve (moe_loss.png).
"""

from __future__ import annotations

import os

# Without a GPU, XLA's CPU platform emulates 8 devices so that EP has ranks to spread over. The
# flag only affects the CPU platform and is read when the first backend starts, which has not
# happened yet (importing jax does not start one).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_ep.nn.lm_config import LMConfig  # noqa: E402
from jax_ep.nn.synthetic import TopicMarkovText  # noqa: E402


DESCRIPTION = ("Trains a small MoE language model on synthetic text with expert parallelism "
               "(jax_ep dispatch/combine) over every device; writes a loss curve.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jax_ep.demo", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (all devices)")
    p.add_argument("--seq_len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=64, help="vocabulary of the synthetic text")
    p.add_argument("--topics", type=int, default=4, help="Markov chains in the synthetic text")
    p.add_argument("--d_model", type=int, default=64, help="hidden size H")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--experts", type=int, default=8, help="experts E per MoE layer")
    p.add_argument("--top_k", type=int, default=2, help="experts per token")
    p.add_argument("--ffn", type=int, default=128, help="each expert's SwiGLU width F")
    p.add_argument("--shared_ffn", type=int, default=0, help="shared expert width (0: none)")
    p.add_argument("--router", choices=("softmax", "sigmoid"), default="softmax")
    p.add_argument("--capacity_factor", type=float, default=None,
                   help="receive capacity per rank in units of T*k (default: dropless)")
    p.add_argument("--aux_coef", type=float, default=0.01, help="weight of the aux loss")
    p.add_argument("--tie_embeddings", action="store_true", help="output head = embeddings^T")
    p.add_argument("--ep", type=int, default=None,
                   help="devices on the 'expert' axis (default: all); the rest form 'data'")
    p.add_argument("--backend", choices=("auto", "reference", "cuda"), default="auto",
                   help="jax_ep backend; auto = cuda on GPUs, reference elsewhere")
    p.add_argument("--framework", choices=("flax", "equinox"), default="flax")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=10, help="print every this many steps")
    p.add_argument("--plot", default="moe_loss.png", help="loss curve PNG ('' for none)")
    return p.parse_args(argv)


def make_mesh(ep: int | None) -> Mesh:
    """('data', 'expert') over every device, `ep` of them on the expert axis."""
    devices = jax.devices()
    ep = ep or len(devices)
    if len(devices) % ep:
        raise ValueError(f"--ep {ep} does not divide the {len(devices)} devices")
    return Mesh(np.array(devices).reshape(len(devices) // ep, ep), ("data", "expert"))


def build_model(framework: str, cfg: LMConfig, mesh: Mesh, seed: int):
    if framework == "flax":
        from jax_ep.nn import lm_flax as lm
    else:
        from jax_ep.nn import lm_equinox as lm
    return lm.build(cfg, mesh, seed)


def make_train_step(apply, tx, aux_coef: float):
    import optax

    def loss_fn(params, tokens):
        logits, aux = apply(params, tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return ce + aux_coef * aux, (ce, aux)

    @jax.jit
    def step(params, opt_state, tokens):
        (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, aux

    return step


def replicate_rest(params, mesh: Mesh):
    """Expert weights (and their optimiser moments) arrive sharded over 'expert'; everything
    else is replicated on the mesh, so the step's inputs and outputs keep one layout."""
    def place(a):
        if isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh:
            return a
        return jax.device_put(a, NamedSharding(mesh, P()))

    return jax.tree.map(place, params)


def plot_losses(path: str, losses: list[float], floor: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses, label="training loss (cross-entropy)")
    ax.axhline(floor, color="gray", ls="--", label=f"entropy of the data ({floor:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the demo; returns {"losses": [...], "floor": float, "plot": path or None}."""
    import optax

    from jax_ep.nn import moe_math

    args = parse_args(argv)
    mesh = make_mesh(args.ep)
    if args.batch % mesh.size:
        raise ValueError(f"--batch {args.batch} must be a multiple of the {mesh.size} devices")
    cfg = LMConfig(vocab=args.vocab, seq_len=args.seq_len, d_model=args.d_model,
                   heads=args.heads, layers=args.layers, ffn=args.ffn, experts=args.experts,
                   top_k=args.top_k, shared_ffn=args.shared_ffn, router=args.router,
                   capacity_factor=args.capacity_factor, tie_embeddings=args.tie_embeddings,
                   backend=args.backend)
    data = TopicMarkovText(args.vocab, args.topics, seed=args.seed)
    floor = data.entropy_floor(args.seq_len + 1)
    params, apply, spec = build_model(args.framework, cfg, mesh, args.seed)
    params = replicate_rest(params, mesh)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10),
                                                  max(2, args.steps), args.lr / 10)
    tx = optax.adamw(schedule, weight_decay=0.01)
    opt_state = replicate_rest(tx.init(params), mesh)  # else step 2 compiles again
    step = make_train_step(apply, tx, args.aux_coef)
    batch_sharding = NamedSharding(mesh, P(("data", "expert")))
    rng = np.random.default_rng(args.seed + 1)
    tokens_per_step = args.batch * args.seq_len

    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f"jax_ep demo: {jax.device_count()} {jax.devices()[0].platform} devices, mesh "
          f"{dict(mesh.shape)}, {args.framework} MoE LM with {n_params:,} parameters, "
          f"{args.layers} layers x {args.experts} experts (top-{args.top_k}, "
          f"{args.experts // mesh.shape['expert']} per device)")
    print(f"data: {args.topics} Markov chains over {args.vocab} tokens; ln(vocab) = "
          f"{np.log(args.vocab):.2f}, entropy floor = {floor:.2f} nats/token")

    losses: list[float] = []
    t_start = time.perf_counter()
    t_last, tokens_since = t_start, 0
    for i in range(1, args.steps + 1):
        batch = jax.device_put(data.sample(rng, args.batch, args.seq_len + 1), batch_sharding)
        params, opt_state, ce, aux = step(params, opt_state, batch)
        loss = float(ce)  # waits for the step: the timing below is of finished work
        losses.append(loss)
        if i == 1:
            backend = moe_math.group_for(spec, tokens_per_step // mesh.size).backend_name
            print(f"step    1  loss {loss:.3f}  aux {float(aux):.3f}  (compiled in "
                  f"{time.perf_counter() - t_start:.1f} s; jax_ep backend: {backend})")
            t_last, tokens_since = time.perf_counter(), 0
            continue
        tokens_since += tokens_per_step
        if i % args.log_every == 0 or i == args.steps:
            now = time.perf_counter()
            print(f"step {i:4d}  loss {loss:.3f}  aux {float(aux):.3f}  "
                  f"{tokens_since / (now - t_last):,.0f} tokens/s")
            t_last, tokens_since = now, 0
    tail = float(np.mean(losses[-10:]))
    print(f"loss: first step {losses[0]:.3f} -> last 10 steps {tail:.3f} (floor {floor:.2f}) "
          f"in {time.perf_counter() - t_start:.0f} s")
    plot = args.plot or None
    if plot:
        plot_losses(plot, losses, floor, f"{args.framework} MoE LM, E={args.experts}, "
                    f"top-{args.top_k}, EP over {mesh.shape['expert']} devices")
        print(f"wrote {plot}")
    return {"losses": losses, "floor": floor, "plot": plot}


if __name__ == "__main__":
    main()
