"""A small MoE LM served as real models are: prefill through a normal-layout group, a decode loop
through a low-latency group, both alive in one process (tests/prefill_decode_model.py)."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from tests import prefill_decode_model as model


def _generate(mesh, spec, backend):
    params = model.init_params(spec)
    prefill, decode = model.groups_for(mesh, spec, backend)
    try:
        return model.generate(mesh, spec, params, model.prompts_for(spec), prefill, decode)
    finally:
        decode.close()
        prefill.close()


def _assert_same_generation(got, want):
    (tokens, logits), (tokens_want, logits_want) = got, want
    np.testing.assert_allclose(logits, logits_want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(tokens, tokens_want)


def test_decode_through_the_padded_layout_equals_a_dense_recomputation():
    """CPU, 8 ranks: each generated token's logits equal a prefill of the whole sequence so far
    (the decode cache and the padded layout change nothing)."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("expert",))
    spec = model.ModelSpec()
    tokens, logits = _generate(mesh, spec, "reference")
    # Re-run prefill on prompt + generated tokens: its last-position logits are step j's.
    params = model.init_params(spec)
    prompts = model.prompts_for(spec)
    for j in (0, spec.steps - 1):
        longer = dataclasses.replace(spec, prompt=spec.prompt + j, steps=1)
        seq = np.concatenate([prompts, tokens[:, :j]], axis=1)
        prefill, decode = model.groups_for(mesh, longer, "reference")
        try:
            _, first_logits = model.generate(mesh, longer, params, seq, prefill, decode)
        finally:
            decode.close()
            prefill.close()
        np.testing.assert_allclose(logits[:, j], first_logits[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_prefill_and_decode_groups_in_one_process_equal_the_reference():
    """One GPU: the cuda groups generate the reference backend's tokens and logits."""
    mesh = Mesh(np.array(jax.devices("gpu")[:1]), ("expert",))
    spec = model.ModelSpec(batch=4)
    _assert_same_generation(_generate(mesh, spec, "cuda"), _generate(mesh, spec, "reference"))
