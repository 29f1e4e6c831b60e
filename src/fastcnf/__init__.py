"""fastcnf: fast continuous normalizing flows.

The names a user needs, loaded on first use (importing ``fastcnf`` stays cheap)::

    from fastcnf import load_recipe, Trainer
    metrics = Trainer(load_recipe("toy-ffjord", ["train.iterations=100"]), "runs/toy").fit()

    from fastcnf import CNFBlock, ConcatSquashMLP, ExactTrace, FlowModel, SequentialFlow, SolverConfig
    model = FlowModel(SequentialFlow([CNFBlock(ConcatSquashMLP(2), ExactTrace())], input_shape=(2,)))
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "Config": "fastcnf.methods",
    "ConfigError": "fastcnf.config",
    "SolverConfig": "fastcnf.config",
    "load_recipe": "fastcnf.methods",
    "METHODS": "fastcnf.methods",
    "list_recipes": "fastcnf.config",
    "DataConfig": "fastcnf.config",
    "load_data": "fastcnf.data",
    "solve": "fastcnf.ode.solve",
    "CNFBlock": "fastcnf.cnf.block",
    "ConcatSquashMLP": "fastcnf.cnf.dynamics",
    "ConcatSquashConvNet": "fastcnf.cnf.dynamics",
    "ExactTrace": "fastcnf.cnf.divergence",
    "Hutchinson": "fastcnf.cnf.divergence",
    "SequentialFlow": "fastcnf.flows.sequential",
    "FlowModel": "fastcnf.models.flow_model",
    "build_model": "fastcnf.methods",
    "evaluate_density": "fastcnf.evaluation.metrics",
    "Trainer": "fastcnf.training.trainer",
    "log_prob": "fastcnf.cnf.likelihood",
    "LogProbResult": "fastcnf.cnf.likelihood",
    "UNetVelocity": "fastcnf.cnf.unet",
    "flow_matching_loss": "fastcnf.flow_matching.loss",
    "load_run": "fastcnf.training.trained_run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastcnf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
