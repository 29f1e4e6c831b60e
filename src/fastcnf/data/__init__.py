"""Data sets: FFJORD's 2-D toys, InfoCNF's 1-D mixture, digits, MNIST, F-MNIST, CIFAR-10.

Everything goes through one call::

    from fastcnf.data import DataConfig, load_data, dequantize
    bundle = load_data(DataConfig(name="digits"), seed=0)
    x = dequantize(bundle.train.x[:64], bundle.levels)   # float32 in [0, 1)

``DATASETS`` maps every valid name to a one-line description.
"""
from .batcher import Batcher, shard_rows
from .base import DataBundle, DataError, DataSplit, Sampler, check_finite, dequantize
from .images import read_cifar10_batch, read_idx
from .registry import DATASETS, DataConfig, load_data
from .toy import TOY_SAMPLERS, mix1d_density, sample_mix1d

__all__ = [
    "Batcher",
    "shard_rows",
    "DataBundle",
    "DataError",
    "DataSplit",
    "Sampler",
    "check_finite",
    "dequantize",
    "read_idx",
    "read_cifar10_batch",
    "DATASETS",
    "DataConfig",
    "load_data",
    "TOY_SAMPLERS",
    "mix1d_density",
    "sample_mix1d",
]
