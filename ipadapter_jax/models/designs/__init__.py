"""Adapter designs as plug-ins (see `base.AdapterDesign`): the registry of the designs by name.

    decoupled  the paper's decoupled cross-attention (the official files' design)
    simple     image tokens appended to the text tokens through the frozen text cross-attention (Fig. 10)
    gated      the decoupled image branch through a learned per-layer tanh gate, initialised closed

A new design: one file here with an `AdapterDesign` subclass, its entry in `DESIGNS` and its name in
`choices.ADAPTER_DESIGNS`.
"""

from __future__ import annotations

from ipadapter_jax.choices import ADAPTER_DESIGNS
from ipadapter_jax.models.designs.base import AdapterDesign
from ipadapter_jax.models.designs.decoupled import DecoupledDesign
from ipadapter_jax.models.designs.gated import GatedDesign
from ipadapter_jax.models.designs.simple import SimpleDesign

DESIGNS: dict[str, AdapterDesign] = {
    "decoupled": DecoupledDesign(),
    "simple": SimpleDesign(),
    "gated": GatedDesign(),
}


def get_design(name: str) -> AdapterDesign:
    """The registered design called `name`; ValueError naming the known ones otherwise."""
    if name not in DESIGNS:
        raise ValueError(f"adapter design must be one of {ADAPTER_DESIGNS}, got {name!r}")
    return DESIGNS[name]
