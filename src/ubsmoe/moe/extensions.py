"""`BlockExtension`: a piece a method attaches to every UB-SMoE block without the block knowing the method.

The block calls its extensions at three points: `observe_routing(probs, expert_index)` after routing in
a training forward (the routing probabilities (T, M) and the chosen experts (T, K)), `routed_output(y)`
on the routed experts' combined output before any shared expert is added, and `aux_loss()` once per
training step (a term for the client's loss, then forgotten). A client-local extension
(`client_local = True`) has parameters each client keeps for itself: the block holds it in
`local_extensions`, so its keys (`<block>.local_extensions.<name>.<param>`) are never aggregated.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

__all__ = ["LOCAL_EXTENSIONS", "BlockExtension"]

LOCAL_EXTENSIONS = "local_extensions"
"""The block attribute (and key component) of client-local extensions."""


class BlockExtension(nn.Module):
    """Does nothing; subclasses override what they need (see the module docstring)."""

    client_local: ClassVar[bool] = False

    def observe_routing(self, probs: torch.Tensor, expert_index: torch.Tensor) -> None:
        """Called after routing in a training forward."""

    def routed_output(self, routed: torch.Tensor) -> torch.Tensor:
        """The routed experts' output, changed (or not)."""
        return routed

    def aux_loss(self) -> torch.Tensor | None:
        """This step's extra loss term, then forgotten (None: none)."""
        return None
