"""Tucker-2 factorisation of convolutions and rank selection (EVBMF, energy, global budget); see issue 5.

Pure functions only: the ``tucker`` method maps a model's convs onto these.
"""

from compressor.factorize.evbmf import EVBMFResult, energy_rank, evbmf
from compressor.factorize.tucker2 import (
    ConvShape,
    Cost,
    RankAllocation,
    Tucker2Factors,
    allocate_ranks_for_target,
    conv_cost,
    factorize_conv,
    select_ranks,
    tucker2_cost,
    tucker2_decompose,
    tucker2_shrinks,
)

__all__ = [
    "ConvShape",
    "Cost",
    "EVBMFResult",
    "RankAllocation",
    "Tucker2Factors",
    "allocate_ranks_for_target",
    "conv_cost",
    "energy_rank",
    "evbmf",
    "factorize_conv",
    "select_ranks",
    "tucker2_cost",
    "tucker2_decompose",
    "tucker2_shrinks",
]
