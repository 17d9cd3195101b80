"""The compiled extension loads, registers its FFI targets, and matches the Python package; the
typed functions of jax_ep/backends/cuda/calls.py match the handlers' Bind."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ep import _ext
from jax_ep.backends.cuda import calls


def test_abi_version_through_an_ffi_call():
    assert int(np.asarray(_ext.abi_version_via_ffi())) == _ext.ABI_VERSION


def test_cuda_targets_exist_exactly_when_built_with_cuda():
    targets = set(_ext.module().cuda_targets())
    if _ext.with_cuda():
        assert {"jax_ep_dispatch", "jax_ep_redispatch", "jax_ep_combine"} <= targets
    else:
        assert not targets


# --- calls.py against the handlers' Bind -------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# Element type a Bind slot accepts, as StableHLO names it (None: any).
_BIND_TYPES = {"ffi::Buffer<ffi::F32>": "f32", "ffi::Buffer<ffi::S32>": "i32",
               "ffi::AnyBuffer": None}


def _bind(handler: str) -> tuple[list, list]:
    """The element types of `handler`'s Bind (its .Arg and .Ret lines) in ffi/*_handlers.cc."""
    for path in sorted((ROOT / "ffi").glob("*_handlers.cc")):
        text = path.read_text()
        at = text.find(f"XLA_FFI_DEFINE_HANDLER_SYMBOL(\n    {handler},")
        if at >= 0:
            block = text[at:text.index("{ffi::Traits", at)]
            return ([_BIND_TYPES[a] for a in re.findall(r"\.Arg<(.+?)>\(\)", block)],
                    [_BIND_TYPES[r] for r in re.findall(r"\.Ret<(.+?)>\(\)", block)])
    raise AssertionError(f"no Bind of {handler} in ffi/")


def _custom_call_types(fn, args, target: str) -> tuple[list, list]:
    """The element types of the operands and results of `target`'s custom call in fn's program
    (lowered on this machine: no GPU or CUDA build needed)."""
    text = jax.jit(fn).lower(*args).as_text()
    line = next(ln for ln in text.splitlines() if f"custom_call @{target}(" in ln)
    operands, results = line.rsplit(" : ", 1)[1].split(" -> ")

    def types(part):
        return [t.split("x")[-1] for t in re.findall(r"tensor<([^>]*)>", part)]

    return types(operands), types(results)


def _i32(*shape):
    return jnp.zeros(shape, jnp.int32)


def _f32(*shape):
    return jnp.zeros(shape, jnp.float32)


_ATTRS = dict(group_id=1, num_sms=4)
_PADDED = dict(experts_local=2, num_ranks=4, max_tokens=5, **_ATTRS)
# (handler, target, function, arguments): each call in the forms the backends use, optional
# operands present and absent, the hierarchical host groups' sources table and the flat None.
_CALLS = [
    ("JaxEpDispatchCuda", "jax_ep_dispatch",
     lambda x, i, w: calls.dispatch(x, i, w, capacity=16, experts_local=2, **_ATTRS),
     (jnp.zeros((4, 8), jnp.bfloat16), _i32(4, 2), _f32(4, 2))),
    ("JaxEpRedispatchCuda", "jax_ep_redispatch",
     lambda v, r, n: calls.redispatch(None, v, r, r, n, capacity=16, with_row_src=True, **_ATTRS),
     (_f32(4, 2), _i32(4, 2), _i32())),
    ("JaxEpCombineCuda", "jax_ep_combine",
     lambda x, r, s, n: calls.combine(x, None, None, r, r, s, n, out_f32=True, **_ATTRS),
     (jnp.zeros((16, 8), jnp.bfloat16), _i32(4, 2), _i32(16), _i32())),
    ("JaxEpPaddedDispatchCuda", "jax_ep_padded_dispatch",
     lambda x, i, w, src: calls.padded_dispatch(x, None, i, w, src, **_PADDED),
     (jnp.zeros((10, 8), jnp.bfloat16), _i32(10, 2), _f32(10, 2), _i32(2, 4))),
    ("JaxEpPaddedDispatchCuda", "jax_ep_padded_dispatch",
     lambda s, i, w: calls.padded_dispatch(None, s, i, w, **_PADDED),
     (_f32(5, 1), _i32(5, 2), _f32(5, 2))),
    ("JaxEpPaddedCombineCuda", "jax_ep_padded_combine",
     lambda x, c, e, src: calls.padded_combine(x, None, None, c, e, e, src, out_f32=True,
                                               **_ATTRS),
     (jnp.zeros((2, 20, 8), jnp.bfloat16), _i32(2, 4), _i32(10, 2), _i32(2, 4))),
    ("JaxEpPaddedCombineCuda", "jax_ep_padded_combine",
     lambda v, c, e: calls.padded_combine(None, v, v, c, e, e, out_f32=False, **_ATTRS),
     (_f32(2, 20), _i32(2, 4), _i32(5, 2))),
]


@pytest.mark.parametrize("handler,target,fn,args", _CALLS,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(_CALLS)])
def test_calls_pass_the_element_types_of_the_bind(handler, target, fn, args):
    """Each typed function of jax_ep/backends/cuda/calls.py passes its handler's Bind as many
    operands and results as it lists, absent ones (empty arrays) included, each in the element
    type of its slot: XLA refuses a mismatch when it decodes the call on the GPU."""
    want_args, want_rets = _bind(handler)
    got_args, got_rets = _custom_call_types(fn, args, target)
    assert len(got_args) == len(want_args) and len(got_rets) == len(want_rets), (
        got_args, want_args, got_rets, want_rets)
    for got, want in zip(got_args + got_rets, want_args + want_rets):
        assert want is None or got == want, (got_args, want_args, got_rets, want_rets)
