"""Configuration section of reflow and distillation (Liu et al. 2023, "Flow Straight and Fast:
Learning to Generate and Transfer Data with Rectified Flow", §2.3): flow matching on fixed
(noise, sample) pairs drawn from a trained teacher."""
from __future__ import annotations

from dataclasses import dataclass

from fastcnf.config import ConfigError, Section

__all__ = ["ReflowConfig"]


@dataclass
class ReflowConfig(Section):
    """Reflow / distillation (``fastcnf reflow``, ``fastcnf distill`` fill it in).

    Attributes:
        pairs: the ``pairs.npz`` of (noise, teacher sample[, label]) pairs; empty: off. The flow
            matching objective then trains on these pairs, the noise kept with its sample (no
            re-pairing, no fresh noise), on the straight path between them.
        teacher: the teacher's checkpoint (``RUN/checkpoints/last.pt``); its prior (e.g. the
            class-conditional source) is copied into the student.
        init: start the student from the teacher's weights (Liu et al. 2023 fine-tune the
            k-rectified flow into the (k+1)-rectified one); false: a fresh network, the teacher's prior.
        grid_steps: distillation to ``k`` Euler steps: train only at the ``k`` times the k-step
            Euler sampler evaluates (``t = 1, 1 - 1/k, ..., 1/k``; ``k = 1`` is Liu et al.'s one-step
            distillation, eq. 7 with ``t = 0`` in their time). 0: uniform times (reflow).
    """

    _key = "reflow"
    pairs: str = ""
    teacher: str = ""
    init: bool = True
    grid_steps: int = 0

    def check(self) -> None:
        if isinstance(self.grid_steps, bool) or not isinstance(self.grid_steps, int) or self.grid_steps < 0:
            raise ConfigError(f"reflow.grid_steps must be an integer >= 0, got {self.grid_steps!r}")
        if self.grid_steps and not self.pairs:
            raise ConfigError("reflow.grid_steps needs reflow.pairs (distillation trains on a teacher's pairs)")
