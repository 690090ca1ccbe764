"""Preprocessing defenses as ``nn.Module``s placed in front of a victim: ``build_defense(name, **params)``.

Each maps pixels in [0, 1] of shape (N, C, H, W) to the same shape and range, batched, on CPU or CUDA.
One file per defense (importing it registers it): ``none``, ``jpeg``, ``bit_depth``, ``gaussian``,
``randomization`` (R&P), ``nrp`` and ``diffpure`` (both need user-supplied weights; diffusers is
imported only when a DiffPure is built). ``conf/defense/*.yaml`` holds the paper's named settings.
"""

from trigact.defenses import (  # noqa: F401  (registration side effect)
    bit_depth,
    diffpure,
    gaussian,
    jpeg,
    none,
    nrp,
    randomization,
)
from trigact.defenses.base import Defense, SeededDefense
from trigact.defenses.bit_depth import BitDepthReduction
from trigact.defenses.diffpure import DiffPure
from trigact.defenses.gaussian import GaussianFilter
from trigact.defenses.jpeg import JPEGCompression
from trigact.defenses.none import NoDefense
from trigact.defenses.nrp import NRPGenerator, NRPPurifier, NRPResGenerator
from trigact.defenses.randomization import RandomResizePad
from trigact.defenses.registry import (
    DefendedModel,
    DefenseInfo,
    build_defense,
    build_defense_from_config,
    defended,
    defense_info,
    list_defenses,
    register_defense,
)

__all__ = [
    "BitDepthReduction",
    "DefendedModel",
    "Defense",
    "DefenseInfo",
    "DiffPure",
    "GaussianFilter",
    "JPEGCompression",
    "NRPGenerator",
    "NRPPurifier",
    "NRPResGenerator",
    "NoDefense",
    "RandomResizePad",
    "SeededDefense",
    "build_defense",
    "build_defense_from_config",
    "defended",
    "defense_info",
    "list_defenses",
    "register_defense",
]
