"""Many EP groups alive at once in one process (cuda backend on a GPU; marker `gpu`).

A model holds several groups: a prefill group and a decode group, layers of different widths,
training and evaluation batch sizes. Each group here differs from the others in E, k, H, dtype,
max_tokens, num_sms and layout (normal, padded, fp8); every group must keep computing what its
reference-backend twin computes whatever the others did: used in any order, in separate programs
and in one program, before and after other groups close, and next to groups created later.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jax_ep
from tests import harness

pytestmark = pytest.mark.gpu


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    name: str
    num_experts: int
    top_k: int
    max_tokens: int
    hidden: int
    dtype: str
    layout: str = "normal"  # normal | padded
    fp8: bool = False
    num_sms: int = 24
    tokens: int | None = None  # T of the calls (default max_tokens)

    def config(self) -> jax_ep.EPConfig:
        return jax_ep.EPConfig(num_experts=self.num_experts, top_k=self.top_k,
                               max_tokens=self.max_tokens, hidden_size=self.hidden,
                               dtype=self.dtype, num_sms=self.num_sms,
                               padded_layout=self.layout == "padded", timeout_s=60.0)


# "A" then "B" is the sequence that broke A (the layout kernels' shared-memory limit followed
# the last group's E); E=2048 needs more than the default 48 KiB for its layout pass.
SPECS = [
    GroupSpec("A_e64_k8_bf16", 64, 8, 512, 1024, "bfloat16"),
    GroupSpec("B_e16_k2_f32", 16, 2, 512, 512, "float32"),
    GroupSpec("C_e2048_k4", 2048, 4, 256, 256, "bfloat16", num_sms=8, tokens=200),
    GroupSpec("D_padded_f16", 8, 4, 64, 256, "float16", layout="padded", num_sms=8, tokens=33),
    GroupSpec("E_padded_fp8", 32, 8, 128, 512, "bfloat16", layout="padded", fp8=True,
              num_sms=16),
    GroupSpec("F_normal_fp8", 64, 2, 64, 256, "bfloat16", fp8=True, num_sms=132, tokens=50),
    GroupSpec("G_top1_f32", 4, 1, 2048, 128, "float32", num_sms=4, tokens=1500),
]


def one_gpu_mesh() -> Mesh:
    return Mesh(np.array(jax.devices("gpu")[:1]), ("expert",))


def inputs(spec: GroupSpec, seed: int):
    rng = np.random.default_rng(seed)
    t = spec.tokens or spec.max_tokens
    idx, w = harness.random_routing(rng, 1, t, spec.top_k, spec.num_experts)
    x = harness.random_tokens(rng, 1, t, spec.hidden, jnp.dtype(spec.dtype))
    return x, idx, w


def body(group: jax_ep.EPGroup, spec: GroupSpec):
    """One rank's dispatch and fused weighted combine, as a model layer makes them."""

    def fn(x, idx, w):
        scales = None
        if spec.fp8:
            x, scales = jax_ep.quantize_fp8(x)
        d = jax_ep.dispatch(group, x, idx, w, layout=spec.layout, x_scales=scales)
        rows = d.x if not spec.fp8 else jax_ep.dequantize_fp8(d.x, d.scales, jnp.bfloat16)
        out = jax_ep.combine(group, rows, d.handle, weights=d.weights)
        return (d.x, d.weights, d.group_sizes, d.num_dropped, d.scales), out

    return fn


def run(group: jax_ep.EPGroup, spec: GroupSpec, seed: int):
    out = harness.per_rank(group.mesh, body(group, spec))(*inputs(spec, seed))
    group.check()
    return jax.tree.map(np.asarray, out)


def run_together(groups, specs, seed: int):
    """Every group's call in one jitted program (in the order given)."""
    fns = [body(g, s) for g, s in zip(groups, specs)]

    def all_calls(*args):
        return tuple(fn(*args[3 * i:3 * i + 3]) for i, fn in enumerate(fns))

    args = [a for s in specs for a in inputs(s, seed)]
    out = harness.per_rank(groups[0].mesh, all_calls)(*args)
    for g in groups:
        g.check()
    return jax.tree.map(np.asarray, out)


def assert_same_as_reference(got, want, spec: GroupSpec) -> None:
    """Dispatch moves bytes (equal bit for bit); combine sums in float32 (within rounding)."""
    (d_got, out_got), (d_want, out_want) = got, want
    harness.assert_same_bytes(d_got, d_want)
    out_dtype = jnp.bfloat16 if spec.fp8 else jnp.dtype(spec.dtype)
    eps = float(jnp.finfo(out_dtype).eps)
    want64 = np.asarray(out_want, np.float64)
    np.testing.assert_allclose(np.asarray(out_got, np.float64), want64, rtol=4 * eps,
                               atol=4 * eps * max(1.0, float(np.abs(want64).max(initial=0))),
                               err_msg=spec.name)


@pytest.fixture(scope="module")
def reference_results():
    """What each spec computes on the reference backend, for seeds 0 and 1."""
    mesh = one_gpu_mesh()
    out = {}
    for spec in SPECS:
        with jax_ep.EPGroup(mesh, "expert", spec.config(), backend="reference") as g:
            out[spec.name] = {seed: run(g, spec, seed) for seed in (0, 1)}
    return out


def make(spec: GroupSpec) -> jax_ep.EPGroup:
    return jax_ep.EPGroup(one_gpu_mesh(), "expert", spec.config(), backend="cuda")


def test_the_reported_sequence_a_then_b_then_a(reference_results):
    a_spec, b_spec = SPECS[0], SPECS[1]
    a = make(a_spec)
    try:
        assert_same_as_reference(run(a, a_spec, 0), reference_results[a_spec.name][0], a_spec)
        b = make(b_spec)
        try:
            assert_same_as_reference(run(b, b_spec, 0), reference_results[b_spec.name][0], b_spec)
            assert_same_as_reference(run(a, a_spec, 1), reference_results[a_spec.name][1], a_spec)
            both = run_together([a, b], [a_spec, b_spec], 1)
            for got, spec in zip(both, (a_spec, b_spec)):
                assert_same_as_reference(got, reference_results[spec.name][1], spec)
        finally:
            b.close()
        assert_same_as_reference(run(a, a_spec, 0), reference_results[a_spec.name][0], a_spec)
    finally:
        a.close()


def test_every_mix_alive_at_once_in_any_order(reference_results):
    groups = [make(s) for s in SPECS]
    try:
        for order in (range(len(SPECS)), reversed(range(len(SPECS))), [3, 0, 6, 2, 5, 1, 4]):
            for i in order:
                seed = i % 2
                assert_same_as_reference(run(groups[i], SPECS[i], seed),
                                         reference_results[SPECS[i].name][seed], SPECS[i])
        # One program with every group, twice in a row (device sequence numbers stay in step).
        for _ in range(2):
            together = run_together(groups[::-1], SPECS[::-1], 0)
            for got, spec in zip(together, SPECS[::-1]):
                assert_same_as_reference(got, reference_results[spec.name][0], spec)
    finally:
        for g in groups:
            g.close()


def test_groups_keep_working_after_others_close_and_new_ones_open(reference_results):
    groups = {s.name: make(s) for s in SPECS}
    specs = {s.name: s for s in SPECS}
    try:
        # Close the largest-E group and the f32 one, then open a small-E group after them.
        for name in ("C_e2048_k4", "B_e16_k2_f32"):
            groups.pop(name).close()
        late = GroupSpec("H_late_e8", 8, 2, 128, 256, "bfloat16", num_sms=2)
        with jax_ep.EPGroup(one_gpu_mesh(), "expert", late.config(), backend="reference") as r:
            late_want = run(r, late, 0)
        groups[late.name] = make(late)
        specs[late.name] = late
        want = dict(reference_results)
        want[late.name] = {0: late_want}
        for name, g in groups.items():
            assert_same_as_reference(run(g, specs[name], 0), want[name][0], specs[name])
        names = list(groups)
        together = run_together([groups[n] for n in names], [specs[n] for n in names], 0)
        for got, name in zip(together, names):
            assert_same_as_reference(got, want[name][0], specs[name])
    finally:
        for g in groups.values():
            g.close()


def test_create_use_close_cycles_return_gpu_memory():
    """20 cycles of a DeepSeek-V3-size group (E=256, top-8, H=7168, 4096 tokens, bf16): the
    driver's free memory after the last close equals what it was after the first."""
    from jax_ep import _ext

    spec = GroupSpec("dsv3", 256, 8, 4096, 7168, "bfloat16", tokens=256)
    device = jax.devices("gpu")[0].local_hardware_id
    free_before = _ext.module().device_memory(device)[0]
    free_after = []
    for cycle in range(20):
        group = make(spec)
        buffer = group.backend.buffer_bytes()
        run(group, spec, cycle % 2)
        group.close()
        free_after.append(_ext.module().device_memory(device)[0])
    print(f"dsv3 group buffer {buffer / 2**20:.1f} MiB; free before: {free_before / 2**20:.1f} "
          f"MiB, after cycles 1, 2, 20: {free_after[0] / 2**20:.1f} / {free_after[1] / 2**20:.1f} / "
          f"{free_after[-1] / 2**20:.1f} MiB")
    # Cycle 1 loads kernels and compiles programs; from then on each close gives back every byte
    # (a leak of one buffer per cycle would be 19 buffers here).
    assert abs(free_after[-1] - free_after[1]) < max(buffer // 8, 2**20), free_after


def test_dispatch_and_combine_each_take_their_own_sm_budget(reference_results):
    """num_sms per call: dispatch on 2 SMs, combine on all of them, the same results."""
    spec = SPECS[0]
    group = make(spec)
    try:
        def fn(x, idx, w):
            d = jax_ep.dispatch(group, x, idx, w, num_sms=2)
            out = jax_ep.combine(group, d.x, d.handle, weights=d.weights, num_sms=132)
            return (d.x, d.weights, d.group_sizes, d.num_dropped, d.scales), out

        got = jax.tree.map(np.asarray, harness.per_rank(group.mesh, fn)(*inputs(spec, 0)))
        group.check()
        assert_same_as_reference(got, reference_results[spec.name][0], spec)
    finally:
        group.close()
