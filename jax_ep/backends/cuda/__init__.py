"""The cuda backend: XLA FFI custom calls over the CUDA kernels of cuda/.

  state.py       the communication buffers of a rank group (allocation, mapping, IPC)
  calls.py       one typed function per FFI target
  normal.py      CudaBackend: the normal layout's operations
  padded.py      CudaPaddedOps: the padded layout's operations, on a CudaBackend's buffers
  intra_host.py  CudaIntraHostLeg, CudaIntraHostPaddedLeg: the hierarchical backend's
                 intra-host legs (normal and padded layouts)
"""

from jax_ep.backends.cuda.intra_host import CudaIntraHostLeg, CudaIntraHostPaddedLeg
from jax_ep.backends.cuda.normal import CudaBackend
from jax_ep.backends.cuda.padded import CudaPaddedOps

__all__ = ["CudaBackend", "CudaIntraHostLeg", "CudaIntraHostPaddedLeg", "CudaPaddedOps"]
