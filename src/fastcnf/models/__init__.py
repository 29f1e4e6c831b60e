"""Models a user holds."""
from fastcnf.models.flow_model import FlowModel, InputError

__all__ = ["FlowModel", "InputError"]
