"""Import torch and faiss together, torch first, with one thread count for both.

Both bundle an OpenMP runtime; importing torch first makes them share it
(faiss first gives two pools fighting over the cores).  Import faiss only
through this module.
"""

from __future__ import annotations

import torch  # noqa: F401  (must precede faiss)
import faiss  # noqa: E402

faiss.omp_set_num_threads(torch.get_num_threads())


def gpu_count() -> int:
    """GPUs faiss can use (0 in CPU builds, where the call still exists)."""
    return faiss.get_num_gpus()
