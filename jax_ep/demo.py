"""Trains a small MoE language model with expert parallelism over every device:

    python -m jax_ep.demo            # 8 emulated CPU devices when there is no GPU
    python -m jax_ep.demo --help     # the flags

The data are sequences from a few fixed sparse Markov chains (jax_ep/nn/synthetic.py): the loss
falls from ln(vocab) towards the chains' entropy, which the demo prints as the floor. The MoE
layers (jax_ep.nn, Flax NNX by default) dispatch tokens to experts with jax_ep over the mesh's
'expert' axis; tokens are split over ('data', 'expert'). Writes a loss curve (moe_loss.png).

Several processes (one per GPU, or per host; docs/launch.md) run one program through
jax.distributed:

    python -m jax_ep.demo --coordinator HOST:PORT --num-processes 2 --process-id 0   # and 1
    srun python -m jax_ep.demo --distributed      # SLURM / Open MPI: detected by JAX
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import numpy as np

from jax_ep._cli import FlagParser
from jax_ep.nn import expert_gemm  # loaded by jax_ep.nn anyway (moe_math uses it)
from jax_ep.nn.lm_config import LMConfig

DESCRIPTION = ("Trains a small MoE language model on synthetic text with expert parallelism "
               "(jax_ep dispatch/combine) over every device (of every process with "
               "--coordinator or --distributed); prints the loss, the load-balancing aux loss "
               "and the tokens dropped for capacity, and writes a loss curve.")
EPILOG = ("The aux loss is the Switch-Transformer load-balancing loss E * sum_e f_e * p_e (f_e: "
          "fraction of the routed slots that went to expert e, p_e: the router's mean "
          "probability for e), averaged over the MoE layers: 1.0 when the load is uniform, up "
          "to E when every token picks the same experts. --aux-coef times it is added to the "
          "cross-entropy so the router keeps the experts evenly loaded; with --capacity-factor "
          "an uneven load overflows the ranks' receive buffers and the overflowing slots are "
          "dropped (counted as 'dropped'). Multi-process recipes: docs/launch.md.")
EXPERT_GEMMS = expert_gemm.IMPLS
BACKENDS = ("auto", "reference", "cuda", "hierarchical")


def _number(cast: type, minimum: float, inclusive: bool, what: str):
    """An argparse `type=` that parses `cast` and requires a finite value >= (or >) minimum, so
    a bad flag is a usage error naming the flag, not a traceback."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (np.isfinite(value) and (value >= minimum if inclusive else value > minimum)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 1, True, "a positive integer")
_non_negative_int = _number(int, 0, True, "an integer >= 0")
_positive_float = _number(float, 0, False, "a positive number")
_non_negative_float = _number(float, 0, True, "a number >= 0")


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m jax_ep.demo", description=DESCRIPTION, epilog=EPILOG)
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=_positive_int, default=400, help="training steps")
    run.add_argument("--batch", type=_positive_int, default=16,
                     help="sequences per step over all devices (a multiple of the device count)")
    run.add_argument("--lr", type=_positive_float, default=3e-3,
                     help="peak AdamW learning rate (warmup, then cosine decay)")
    run.add_argument("--aux-coef", type=_non_negative_float, default=0.01,
                     help="weight of the load-balancing aux loss added to the cross-entropy "
                          "(see below)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of the parameters and of the synthetic data")
    run.add_argument("--log-every", type=_positive_int, default=10,
                     help="print every this many steps")
    run.add_argument("--plot", default="moe_loss.png",
                     help="loss curve PNG written at the end ('' for none)")
    data = p.add_argument_group("synthetic data")
    data.add_argument("--seq-len", type=_positive_int, default=64, help="tokens per sequence")
    data.add_argument("--vocab", type=_positive_int, default=64,
                      help="vocabulary of the synthetic text")
    data.add_argument("--topics", type=_positive_int, default=4,
                      help="Markov chains the sequences are drawn from")
    model = p.add_argument_group("model")
    model.add_argument("--framework", choices=("flax", "equinox"), default="flax",
                       help="the MoE layers and model: jax_ep.nn.flax (NNX) or jax_ep.nn.equinox")
    model.add_argument("--d-model", type=_positive_int, default=64, help="hidden size H")
    model.add_argument("--heads", type=_positive_int, default=4,
                       help="attention heads (must divide --d-model)")
    model.add_argument("--layers", type=_positive_int, default=2, help="transformer blocks")
    model.add_argument("--experts", type=_positive_int, default=8,
                       help="experts E per MoE layer (a multiple of --ep)")
    model.add_argument("--top-k", type=_positive_int, default=2,
                       help="experts per token (at most --experts)")
    model.add_argument("--ffn", type=_positive_int, default=128, help="each expert's SwiGLU width F")
    model.add_argument("--shared-ffn", type=_non_negative_int, default=0,
                       help="width of a shared (always-on) SwiGLU expert; 0: none")
    model.add_argument("--router", choices=("softmax", "sigmoid"), default="softmax",
                       help="router scores: softmax over experts (Mixtral), or sigmoid with the "
                            "top-k weights renormalised (DeepSeek-V3)")
    model.add_argument("--capacity-factor", type=_positive_float, default=None,
                       help="receive capacity per rank in units of T*k tokens; slots beyond it "
                            "are dropped and reported (default: dropless)")
    model.add_argument("--tie-embeddings", action="store_true",
                       help="output head = embeddings^T instead of its own matrix")
    ep = p.add_argument_group("expert parallelism")
    ep.add_argument("--ep", type=_positive_int, default=None,
                    help="devices on the 'expert' axis (default: all); the rest form 'data'; "
                         "must divide the device count")
    ep.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="jax_ep backend: auto = hierarchical when the EP axis spans several "
                         "hosts, else cuda on GPUs (when built with it), else reference "
                         "(python -m jax_ep.info says which and why)")
    ep.add_argument("--expert-gemm", choices=EXPERT_GEMMS, default="auto",
                    help="the experts' grouped-matmul implementation (docs/nn.md): auto = "
                         "ragged off GPUs, capacity on GPUs")
    ep.add_argument("--cpu-devices", type=_positive_int, default=8,
                    help="CPU devices to emulate per process when there is no GPU (ignored "
                         "when XLA_FLAGS already sets --xla_force_host_platform_device_count)")
    mp = p.add_argument_group("several processes (jax.distributed; docs/launch.md)")
    mp.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="address of process 0's coordination service: runs under "
                         "jax.distributed with --num-processes and --process-id")
    mp.add_argument("--num-processes", type=_positive_int, default=None,
                    help="processes in the job (with --coordinator)")
    mp.add_argument("--process-id", type=_non_negative_int, default=None,
                    help="this process's index in [0, --num-processes) (with --coordinator)")
    mp.add_argument("--distributed", action="store_true",
                    help="jax.distributed.initialize() with the cluster detected by JAX (SLURM "
                         "srun, Open MPI mpirun, ...); --coordinator etc. override it")
    return p


def check_static_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the flags alone must satisfy (the device-dependent checks are in check_mesh_args)."""
    if args.d_model % args.heads:
        p.error(f"--heads {args.heads} must divide --d-model {args.d_model}")
    if args.top_k > args.experts:
        p.error(f"--top-k {args.top_k} is larger than --experts {args.experts}")
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit():
            p.error(f"--coordinator must be HOST:PORT, got {args.coordinator!r}")
    explicit = [args.num_processes is not None, args.process_id is not None]
    if any(explicit) and args.coordinator is None:
        p.error("--num-processes and --process-id go with --coordinator HOST:PORT")
    if args.coordinator is not None and not all(explicit) and not args.distributed:
        p.error("--coordinator needs --num-processes and --process-id (or --distributed, to "
                "let JAX detect them)")
    if all(explicit) and args.process_id >= args.num_processes:
        p.error(f"--process-id {args.process_id} must be below --num-processes "
                f"{args.num_processes}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_static_args(p, args)
    return args


def start_jax(args: argparse.Namespace) -> None:
    """Emulated CPU devices and jax.distributed, before the first backend starts (importing jax
    does not start one)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        # Only affects the CPU platform, and is read when the first backend starts.
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    if args.coordinator is None and not args.distributed:
        return
    import jax

    # CPU devices of several processes talk through gloo (no effect on GPUs, where XLA's
    # collectives are NCCL's).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def make_mesh(ep: int | None, error=None):
    """('data', 'expert') over every device (of every process), `ep` of them on the expert
    axis; `error(msg)` reports a bad --ep (argparse's parser.error from main)."""
    import jax
    from jax.sharding import Mesh

    devices = jax.devices()
    ep = ep or len(devices)
    if len(devices) % ep:
        msg = f"--ep {ep} does not divide the {len(devices)} devices"
        if error is None:
            raise ValueError(msg)
        error(msg)
    return Mesh(np.array(devices).reshape(len(devices) // ep, ep), ("data", "expert"))


def check_mesh_args(p: argparse.ArgumentParser, args: argparse.Namespace, mesh) -> None:
    """The flags that depend on the devices (parser.error, like the static ones)."""
    ep = mesh.shape["expert"]
    if args.batch % mesh.size:
        p.error(f"--batch {args.batch} must be a multiple of the {mesh.size} devices (every "
                f"device takes whole sequences)")
    if args.experts % ep:
        p.error(f"--experts {args.experts} must be a multiple of the {ep} devices of the expert "
                f"axis (--ep)")
    if args.backend == "cuda":
        from jax_ep import cuda_available

        platforms = {d.platform for d in mesh.devices.flat}
        if platforms != {"gpu"} or not cuda_available():
            p.error("--backend cuda needs GPUs and jax_ep built with nvcc (python -m jax_ep.info "
                    "says what this install has)")


def build_model(framework: str, cfg: LMConfig, mesh, seed: int):
    if framework == "flax":
        from jax_ep.nn import lm_flax as lm
    else:
        from jax_ep.nn import lm_equinox as lm
    return lm.build(cfg, mesh, seed)


def make_train_step(apply, tx, aux_coef: float):
    import jax
    import optax

    def loss_fn(params, tokens):
        logits, aux = apply(params, tokens[:, :-1])  # aux: lm_config.sum_block_aux
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return ce + aux_coef * aux["aux_loss"], (ce, aux["aux_loss"], aux["num_dropped"])

    @jax.jit
    def step(params, opt_state, tokens):
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats

    return step


def replicate_rest(params, mesh):
    """Expert weights (and their optimiser moments) arrive sharded over 'expert'; everything
    else is replicated on the mesh, so the step's inputs and outputs keep one layout. Every
    process holds the same values (the same seed), so each fills its own devices."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    replicated = NamedSharding(mesh, P())

    def place(a):
        if isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding) and \
                a.sharding.mesh == mesh:
            return a
        if jax.process_count() == 1:
            return jax.device_put(a, replicated)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

    return jax.tree.map(place, params)


def global_batch(tokens: np.ndarray, sharding):
    """The step's [B, S+1] tokens (the same on every process) as one array over the mesh: each
    process fills its own devices' rows."""
    import jax

    return jax.make_array_from_callback(tokens.shape, sharding, lambda index: tokens[index])


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
    """Runs the demo; returns {"losses": [...], "aux": [...], "dropped": [...] (slots dropped
    for capacity per step, over all MoE layers), "floor": float, "plot": path or None, "backend": str}."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_static_args(parser, args)
    start_jax(args)

    import jax
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_ep.nn import moe_math
    from jax_ep.nn.synthetic import TopicMarkovText

    mesh = make_mesh(args.ep, parser.error)
    check_mesh_args(parser, args, mesh)
    lead = jax.process_index() == 0

    def say(text: str) -> None:
        if lead:
            print(text, flush=True)

    cfg = LMConfig(vocab=args.vocab, seq_len=args.seq_len, d_model=args.d_model,
                   heads=args.heads, layers=args.layers, ffn=args.ffn, experts=args.experts,
                   top_k=args.top_k, shared_ffn=args.shared_ffn, router=args.router,
                   capacity_factor=args.capacity_factor, tie_embeddings=args.tie_embeddings,
                   backend=args.backend, expert_gemm=args.expert_gemm)
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
    rng = np.random.default_rng(args.seed + 1)  # the same batches on every process
    tokens_per_step = args.batch * args.seq_len
    slots_per_step = tokens_per_step * args.top_k

    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    procs = (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
    say(f"jax_ep demo: {jax.device_count()} {jax.devices()[0].platform} devices{procs}, mesh "
        f"{dict(mesh.shape)}, {args.framework} MoE LM with {n_params:,} parameters, "
        f"{args.layers} layers x {args.experts} experts (top-{args.top_k}, "
        f"{args.experts // mesh.shape['expert']} per device)")
    say(f"data: {args.topics} Markov chains over {args.vocab} tokens; ln(vocab) = "
        f"{np.log(args.vocab):.2f}, entropy floor = {floor:.2f} nats/token")
    say("aux = load-balancing loss E*sum_e f_e*p_e over the MoE layers (1.0: uniform load); "
        "dropped = routed slots over the receive capacity (always 0 when dropless)")

    losses: list[float] = []
    auxes: list[float] = []
    drops: list[int] = []
    backend = "?"
    t_start = time.perf_counter()
    t_last, tokens_since = t_start, 0
    for i in range(1, args.steps + 1):
        batch = global_batch(data.sample(rng, args.batch, args.seq_len + 1), batch_sharding)
        params, opt_state, (ce, aux, dropped) = step(params, opt_state, batch)
        loss = float(ce)  # waits for the step: the timing below is of finished work
        losses.append(loss)
        auxes.append(float(aux))
        drops.append(int(dropped))
        drop_text = f"  dropped {drops[-1]} of {slots_per_step * args.layers} slots"
        if i == 1:
            backend = moe_math.group_for(spec, tokens_per_step // mesh.size).backend_name
            say(f"step    1  loss {loss:.3f}  aux {auxes[-1]:.3f}{drop_text}  (compiled in "
                f"{time.perf_counter() - t_start:.1f} s; jax_ep backend: {backend})")
            t_last, tokens_since = time.perf_counter(), 0
            continue
        tokens_since += tokens_per_step
        if i % args.log_every == 0 or i == args.steps:
            now = time.perf_counter()
            say(f"step {i:4d}  loss {loss:.3f}  aux {auxes[-1]:.3f}{drop_text}  "
                f"{tokens_since / (now - t_last):,.0f} tokens/s")
            t_last, tokens_since = now, 0
    tail = float(np.mean(losses[-10:]))
    say(f"loss: first step {losses[0]:.3f} -> last 10 steps {tail:.3f} (floor {floor:.2f}) "
        f"in {time.perf_counter() - t_start:.0f} s; last loss {losses[-1]:.4f}")
    if not lead:
        print(f"process {jax.process_index()} of {jax.process_count()}: {args.steps} steps, last "
              f"loss {losses[-1]:.4f}", flush=True)
    say(f"dropped: {sum(drops)} of {slots_per_step * args.layers * len(drops)} routed slots "
        f"over {len(drops)} steps"
        + ("" if args.capacity_factor else " (dropless: --capacity-factor unset)"))
    plot = (args.plot or None) if lead else None
    if plot:
        plot_losses(plot, losses, floor, f"{args.framework} MoE LM, E={args.experts}, "
                    f"top-{args.top_k}, EP over {mesh.shape['expert']} devices")
        say(f"wrote {plot}")
    return {"losses": losses, "aux": auxes, "dropped": drops, "floor": floor, "plot": plot,
            "backend": backend}


def cli() -> None:
    """`python -m jax_ep.demo`: main() with jax_ep's INFO log on stderr (the backend each EP group
    runs on and the device memory it allocates)."""
    import logging

    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("jax_ep").setLevel(logging.INFO)
    main()


if __name__ == "__main__":
    cli()
