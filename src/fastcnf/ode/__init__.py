"""ODE solving through torchdiffeq with NFE accounting."""
from fastcnf.ode.solve import NFECounter, SolverBudgetExceeded, SolverConfig, solve

__all__ = ["NFECounter", "SolverBudgetExceeded", "SolverConfig", "solve"]
