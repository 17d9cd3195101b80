"""MoE layers over jax_ep's dispatch and combine.

    from jax_ep.nn.flax import MoE        # Flax NNX   (pip install 'jax_ep[nn]')
    from jax_ep.nn.equinox import MoE     # Equinox    (pip install 'jax_ep[nn]')

Both hold the parameters of `moe_math.param_shapes` and call `moe_math.moe_forward`; this
package itself imports neither framework. docs/nn.md describes the options, the aux dict,
the sharding metadata and the named scopes / checkpoint names.
"""

from jax_ep.nn.moe_math import (AUX_KEYS, CHECKPOINT_NAMES, MoESpec, build_group,
                                correction_bias_update, init_params, moe_forward, param_shapes,
                                param_specs)

__all__ = ["AUX_KEYS", "CHECKPOINT_NAMES", "MoESpec", "build_group", "correction_bias_update",
           "init_params", "moe_forward", "param_shapes", "param_specs"]
