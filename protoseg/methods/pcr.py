"""PCR: prototype-based consistency regularisation (Xu et al., NeurIPS 2022).

CutMix-Seg's teacher-student step with PCR's prototype branch plugged in, as every ``+pcr``
method has it: a prototype predictor on the student's decoder features, trained on
labelled pixels and on confident teacher pseudo-labels of the mixed view (Eqs. 4-10), with
a bank initialised by k-means after the warm-up (Algorithm 2) and moved by EMA (Eq. 11).
Table 4's ablations are switches of the plug-in: (1) ``prototypes.train_predictor=false``
and ``prototypes.update=false`` (linear predictor only), (2) ``linear_head=false``
(prototype predictor only: pseudo-labels and evaluation from the prototype head),
(3) ``prototypes.update=false`` (a fixed bank).
"""

from __future__ import annotations

from dataclasses import dataclass

from protoseg.components import PrototypePlugIn
from protoseg.methods.cutmix_seg import CutMixSeg, CutMixSegConfig
from protoseg.methods.registry import register_method


@dataclass
class PCRConfig(PrototypePlugIn, CutMixSegConfig):
    """CutMix-Seg's settings plus the prototype plug-in's block and switches."""

    name: str = "pcr"


register_method("pcr", PCRConfig)(CutMixSeg)
