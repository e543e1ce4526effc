"""Feedback bridge: after a layout block, the image tokens inside each box are mean-pooled and a
per-block zero-initialized map adds the result to that instance's token and identity code for the
following layout blocks. There is no bridge after the last layout block (nothing would read it)."""

from __future__ import annotations

from torch import Tensor, nn

from .modulation import zero_linear


class FeedbackBridge(nn.Module):
    def __init__(self, inner_dim: int, identity_dim: int, num_bridges: int, with_token: bool = True):
        super().__init__()
        self.token_dim = inner_dim if with_token else 0
        self.proj = nn.ModuleList(zero_linear(inner_dim, self.token_dim + identity_dim) for _ in range(num_bridges))

    def __len__(self) -> int:
        return len(self.proj)

    def forward(self, j: int, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """P×D pooled image tokens → (token update P×D or P×0, identity-code update P×identity_dim)."""
        out = self.proj[j](pooled.to(self.proj[j].weight.dtype))
        return out[:, : self.token_dim], out[:, self.token_dim :]
