"""fastcnf: fast continuous normalizing flows."""
__version__ = "0.1.0"
