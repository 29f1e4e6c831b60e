"""CNF building blocks: dynamics networks, divergence estimators, end-time policies, regularisers."""
from fastcnf.cnf.block import CNFBlock
from fastcnf.cnf.divergence import DivergenceEstimator, ExactTrace, Hutchinson
from fastcnf.cnf.dynamics import ConcatSquashConvNet, ConcatSquashMLP
from fastcnf.cnf.endtime import EndTimePolicy, FixedEndTime
from fastcnf.cnf.regularizers import JacobianFrobenius, KineticEnergy

__all__ = [
    "CNFBlock", "DivergenceEstimator", "ExactTrace", "Hutchinson",
    "ConcatSquashMLP", "ConcatSquashConvNet", "EndTimePolicy", "FixedEndTime",
    "KineticEnergy", "JacobianFrobenius",
]
