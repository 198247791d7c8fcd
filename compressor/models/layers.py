"""Layers shared by the built-in architectures.

``ChannelShortcut`` is the "option A" shortcut of the CIFAR ResNets (He et al. 2015, section 4.2): a strided spatial
subsample followed by zero channels. It is written as an explicit channel map so that pruning can follow it
(see :mod:`compressor.pruning.shortcut`), which torch-pruning cannot do through a ``lambda`` with ``F.pad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelShortcut(nn.Module):
    """Parameter-free shortcut: ``y[:, j] = x[:, src[j], ::stride, ::stride]``, or zeros where ``src[j] == -1``.

    Freshly built it reproduces option A exactly: ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`` with
    ``p = (out_channels - in_channels) // 2`` zero channels before and the rest after.

    Parameters
    ----------
    in_channels, out_channels : int
        Channel counts; ``out_channels >= in_channels``.
    stride : int
        Spatial subsampling step.

    Notes
    -----
    The map ``src`` is plain Python state (no parameters, no buffers), so the module adds nothing to a state_dict and
    checkpoints of the original lambda-based models load strictly. Pruning edits ``src`` and ``in_channels``;
    rebuilding a pruned model replays the same pruning history.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ChannelShortcut cannot drop channels: {in_channels} -> {out_channels}")
        before = (out_channels - in_channels) // 2
        after = out_channels - in_channels - before
        self.stride = int(stride)
        self.in_channels = int(in_channels)
        self.src: list[int] = [-1] * before + list(range(in_channels)) + [-1] * after

    @property
    def out_channels(self) -> int:
        return len(self.src)

    def _contiguous_plan(self) -> tuple[int, int, int, int] | None:
        """(first input channel, count, zeros before, zeros after) when ``src`` is one run of consecutive inputs."""
        live = [j for j, s in enumerate(self.src) if s >= 0]
        if not live:
            return 0, 0, len(self.src), 0
        first, last = live[0], live[-1]
        start = self.src[first]
        if last - first + 1 != len(live) or any(self.src[j] != start + j - first for j in live):
            return None
        return start, len(live), first, len(self.src) - last - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        plan = self._contiguous_plan()
        if plan is not None:
            start, count, before, after = plan
            if count == 0:
                shape = (x.shape[0], len(self.src), x.shape[2], x.shape[3])
                return x.new_zeros(shape)
            if start != 0 or count != x.shape[1]:
                x = x[:, start : start + count]
            return F.pad(x, (0, 0, 0, 0, before, after)) if before or after else x
        # General case after pruning: gather from the input plus one zero channel at index in_channels.
        index = torch.tensor([s if s >= 0 else self.in_channels for s in self.src], device=x.device)
        padded = torch.cat([x, x.new_zeros((x.shape[0], 1, x.shape[2], x.shape[3]))], dim=1)
        return padded.index_select(1, index)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, stride={self.stride}"
