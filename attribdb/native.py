"""Import torch and faiss together, torch first, with one thread count for both.

Both bundle an OpenMP runtime; importing torch first makes them share it
(faiss first gives two pools fighting over the cores).  Import faiss only
through this module.
"""

from __future__ import annotations

import torch  # noqa: F401  (must precede faiss)

from attribdb.errors import ConfigError

try:
    import faiss  # noqa: E402
except ImportError:
    raise ConfigError("FAISS is not installed: pip install 'attribdb[cpu]', or 'attribdb[gpu]' on a CUDA machine "
                      "(one of the two: both provide the same faiss module)") from None

faiss.omp_set_num_threads(torch.get_num_threads())


def gpu_count() -> int:
    """GPUs faiss can use (0 in CPU builds, where the call still exists)."""
    return faiss.get_num_gpus()
