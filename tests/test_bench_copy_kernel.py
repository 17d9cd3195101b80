"""The bench-only copy kernel (bench/copy_kernel): its build, the bench's skip without a GPU or
nvcc, the x copy(S) column of bench_ep's table, and (marker `gpu`) a byte-for-byte copy."""

import ctypes
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import bench_ep, copy_kernel

build_mod = importlib.import_module("bench.copy_kernel.build")  # the module, not build()


def needs_copy_kernel():
    """Skips without a GPU or nvcc; a failed build or load fails the test."""
    reason = copy_kernel.unavailable()
    if reason and (reason == "no GPU" or reason.startswith("nvcc not found")):
        pytest.skip(reason)
    assert reason is None, reason


def test_table_reports_x_copy_s_and_tb_per_s():
    row = dict(shape="mixtral", bytes_dispatch=2 * 10**8, bytes_combine=2 * 10**8,
               copy_dispatch_s=1e-4, copy_dispatch_span_s=1e-4,
               copy_combine_s=1e-4, copy_combine_span_s=1e-4,
               cuda_sms24_dispatch_s=4e-4, cuda_sms24_dispatch_span_s=3e-4,
               cuda_sms24_combine_s=5e-4, cuda_sms24_combine_span_s=None,
               reference_dispatch_s=1e-3, reference_combine_s=1e-3,
               copy_kernel_sms24_dispatch_s=2e-4, copy_kernel_sms24_dispatch_span_s=1.5e-4,
               copy_kernel_sms24_combine_s=2e-4, copy_kernel_sms24_combine_span_s=2e-4,
               copy_kernel_sms132_dispatch_s=1e-4, copy_kernel_sms132_dispatch_span_s=0.5e-4,
               copy_kernel_sms132_combine_s=1e-4, copy_kernel_sms132_combine_span_s=0.5e-4)
    lines = bench_ep.table_lines([row])
    assert lines[0].split()[-2:] == ["x", "copy(S)"]

    def cols(op, impl):
        return next(ln.split() for ln in lines if ln.split()[1:3] == [op, impl])

    assert cols("dispatch", "cuda_sms24")[-2:] == ["3.00", "2.00"]  # 3e-4 / 1e-4, / 1.5e-4
    assert cols("combine", "cuda_sms24")[-1] == "2.50"  # no span: wall 5e-4 / 2e-4
    assert cols("dispatch", "reference")[-1] == "-"  # no SM budget
    assert cols("dispatch", "copy_kernel_sms132")[-1] == "1.00"
    impls = [ln.split()[2] for ln in lines[1:] if ln.split()[1] == "dispatch"]
    assert impls.index("copy_kernel_sms24") < impls.index("copy_kernel_sms132")
    # bytes read + written over the span: 2e8 / 1.5e-4 s and 2e8 / 0.5e-4 s
    assert lines[-1].split() == ["mixtral", "copy(S)", "TB/s:", "S=24", "1.33", "S=132", "4.00"]


def test_copy_budgets_join_num_sms_and_copy_sms():
    args = bench_ep.parse_args(["--num-sms", "48,24", "--copy-sms", "8,24"])
    assert bench_ep.copy_budgets(args) == [8, 24, 48]
    assert bench_ep.copy_budgets(bench_ep.parse_args(["--num-sms", "", "--copy-sms", ""])) == []


@pytest.mark.skipif(copy_kernel.has_gpu(), reason="checks the skip without a GPU")
def test_bench_skips_the_copy_kernel_without_gpu():
    assert copy_kernel.unavailable() == "no GPU"


def test_build_without_nvcc_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "find_nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="nvcc not found"):
        build_mod.build(tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(build_mod.find_nvcc() is None, reason="needs nvcc")
def test_build_makes_a_library_with_the_handler(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDAARCHS", "80;90-real")
    path = build_mod.build(tmp_path)
    assert path.parent == tmp_path and path.exists()
    assert build_mod.build(tmp_path) == path  # reused, not rebuilt
    assert ctypes.cdll.LoadLibrary(str(path)).JaxEpBenchCopy
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


@pytest.mark.gpu
@pytest.mark.parametrize("nbytes,num_blocks", [
    (16, 1), (16, 132), (48, 8),      # less than one step (8 vectors per thread of the grid)
    (16 * (8 * 1024 * 3 + 5), 2),     # one whole step of 2 blocks, then a partial one
    (16 * 8 * 1024 * 4, 4),           # whole steps only
    (16 * 8 * 1024 * 4, 3),
    (16 * (8 * 1024 * 132 * 2 + 8 * 1024 - 1), 132),
])
def test_copy_kernel_copies_every_byte(nbytes, num_blocks):
    needs_copy_kernel()
    x = jax.random.bits(jax.random.key(nbytes + num_blocks), (nbytes,), jnp.uint8)
    y = jax.jit(lambda a: copy_kernel.copy_kernel(a, num_blocks))(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.gpu
def test_copy_kernel_keeps_dtype_and_shape():
    needs_copy_kernel()
    x = jax.random.normal(jax.random.key(0), (1000, 7168), jnp.bfloat16)
    for sms in (24, 132):
        y = copy_kernel.copy_kernel(x, sms)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert np.asarray(y).tobytes() == np.asarray(x).tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("size,num_blocks,match", [(15, 8, "multiple of 16"),
                                                    (16, 0, "num_blocks")])
def test_copy_kernel_refuses_bad_calls(size, num_blocks, match):
    needs_copy_kernel()
    x = jnp.zeros((size,), jnp.uint8)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(copy_kernel.copy_kernel(x, num_blocks))


def test_bench_times_a_working_copy_kernel_at_every_budget(tmp_path, monkeypatch, capsys):
    """bench_ep's wiring, with an XLA stand-in for the kernel (CPU): every budget of --num-sms
    and --copy-sms is timed for both ops, the JSON has the fields, the table the column."""
    import json

    monkeypatch.setattr(copy_kernel, "unavailable", lambda: None)
    monkeypatch.setattr(copy_kernel, "copy_kernel", lambda a, s: a + jnp.uint32(s))
    assert bench_ep.main(["--shapes", "decode", "--tokens", "8", "--num-sms", "", "--copy-sms",
                          "16,8", "--reps", "2", "--trials", "1", "--rounds", "2",
                          "--skip-reference", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["copy_kernel_sms"] == [8, 16]
    assert data["meta"]["copy_kernel_skipped"] is None
    row = data["rows"][0]
    for sms in (8, 16):
        for op in ("dispatch", "combine"):
            assert row[f"copy_kernel_sms{sms}_{op}_s"] > 0
            assert f"copy_kernel_sms{sms}_{op}_span_s" in row
    out = capsys.readouterr().out
    assert "copy kernel: skipped" not in out
    assert "decode       copy(S) TB/s: S=8 " in out
