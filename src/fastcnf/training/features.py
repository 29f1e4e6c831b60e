"""Importing this module registers every feature's hook builder (see fastcnf.training.hooks)."""
from fastcnf.training import conditioning  # noqa: F401  (CCNF / InfoCNF prior and hook)
from fastcnf.training import endtime  # noqa: F401,E402  (TO-FLOW / STEER end times)
from fastcnf.training import tolerances  # noqa: F401,E402  (issue 5: solver tolerances)
from fastcnf.training import latent_ode_task  # noqa: F401,E402  (registers TASKS["latent_ode"])
from fastcnf.training import parts  # noqa: F401,E402  (training by parts, 003)
