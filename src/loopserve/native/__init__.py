"""Native (C) kernels, kept as source files in this package and compiled on first use.

- ``slash_attention.c`` (with ``slash_vector.h`` and the per-shape template
  ``slash_block.h``): sparse prefill attention over vertical and slash lines, used by
  :mod:`loopserve.attention.sparse`;
- ``greedy_cover.c``: the greedy maximum-coverage rounds of Phase 1 line selection, used
  by :mod:`loopserve.attention.cover`;
- ``decode_attention.c``: one decode token of each of several conversations over its own
  keys, used by :mod:`loopserve.attention.decode` (every decode step, alone or batched);
- ``skinny_linear.c``: y = x W^T for up to 16 rows, used by
  :mod:`loopserve.models.native_linear`;
- ``key_scores.c``: Phase 2's re-selection (the attention mass each key receives from the
  buffered queries, and the top rows per head), used by :mod:`loopserve.cache.scoring`.

:func:`native_kernels` builds (or loads the cached build of) all of them into one library; see
:mod:`loopserve.native.loader` (the build, its cache key and failures). Without a
compiler the callers' pure-PyTorch paths run.
"""

from .loader import NATIVE_ENV, NativeKernels, native_kernels, reset_native_kernels
from .scratch import scratch_buffer

__all__ = ["NATIVE_ENV", "NativeKernels", "native_kernels", "reset_native_kernels", "scratch_buffer"]
