"""A loaded database holds its factors once, in the dtype queries use."""

from __future__ import annotations

import gc

import torch

from attribdb.factors import Factors
from attribdb.runtime import Runtime

KEYS = ("eigvecs_out", "eigvecs_in", "diagonal")


def test_runtime_loads_the_factors_once_in_the_compute_dtype(built_db, monkeypatch):
    loaded = []
    original = Factors.load.__func__
    monkeypatch.setattr(Factors, "load", classmethod(lambda cls, *a, **kw: loaded.append(original(cls, *a, **kw))
                                                     or loaded[-1]))
    factors = Runtime.load(built_db).computer.factors
    assert len(loaded) == 1
    for name, f in factors.per_module.items():
        for key in KEYS:
            tensor = getattr(f, key)
            assert tensor.dtype == torch.float32
            # the very tensors that were read: no float64 copy was loaded and then converted
            assert tensor.data_ptr() == getattr(loaded[0][name], key).data_ptr()
    gc.collect()
    shapes = {tuple(getattr(f, key).shape) for f in factors.per_module.values() for key in KEYS}
    assert not [t for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter)
                and t.dtype == torch.float64 and tuple(t.shape) in shapes], "a float64 factor copy is alive"
