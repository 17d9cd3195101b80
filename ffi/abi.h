// The ABI version shared by the Python package and the compiled extension. Python compares it
// with jax_ep/_ext.py's ABI_VERSION at import so a stale build fails loudly instead of
// misreading buffers.
#pragma once
#define JAX_EP_ABI_VERSION 4
