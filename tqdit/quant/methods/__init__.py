"""The methods, one file each, and one record per method: its name, config class and what it does.

``quantize(model, calib, config)`` runs the method whose config class ``config`` is (torchao's shape:
one verb, the config says which method), in place, and returns (model, cost).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from tqdit.quant.config import MethodConfig, ReconstructingConfig, TimeGroupedConfig
from tqdit.quant.methods import (ditas, fp, mrq, mrq_tgq, noise, ptq4dit, ptq4dm, qdiffusion, qdit, tgq,
                                 uniform)
from tqdit.quant.methods.ditas import DiTASConfig
from tqdit.quant.methods.fp import FPConfig
from tqdit.quant.methods.mrq import MRQConfig
from tqdit.quant.methods.mrq_tgq import TQDiTConfig
from tqdit.quant.methods.noise import NoiseConfig
from tqdit.quant.methods.ptq4dit import PTQ4DiTConfig
from tqdit.quant.methods.ptq4dm import PTQ4DMConfig
from tqdit.quant.methods.qdiffusion import QDiffusionConfig
from tqdit.quant.methods.qdit import QDiTConfig
from tqdit.quant.methods.tgq import TGQConfig
from tqdit.quant.methods.uniform import UniformConfig


@dataclass(frozen=True)
class Method:
    """One method: ``run(model, calib, config) -> (model, cost)`` with ``config`` a ``config_class``."""

    name: str
    config_class: type
    run: Callable
    summary: str

    @property
    def uses_time_groups(self) -> bool:
        return issubclass(self.config_class, TimeGroupedConfig)

    @property
    def reconstructs(self) -> bool:
        return issubclass(self.config_class, ReconstructingConfig)

    @property
    def fixed_search(self) -> str | None:
        """The scale rule the method's paper fixes (another ``search`` is an error), if any."""
        return self.config_class.fixed_search

    @property
    def runtime_grids(self) -> bool:
        """Activation grids computed at run time (Q-DiT, DiTAS): simulated quantization only."""
        return self.config_class.runtime_grids

    @property
    def own_settings(self) -> tuple[str, ...]:
        """Names of its settings beyond the shared ones (``quant.params`` in the Hydra configs)."""
        return tuple(self.config_class().own_settings())


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fp", FPConfig, fp.quantize, "no quantization (the reference row)"),
    Method("noise", NoiseConfig, noise.quantize, "control: uniform's grids, noise instead of rounding"),
    Method("uniform", UniformConfig, uniform.quantize, "uniform PTQ, per-tensor activations"),
    Method("ptq4dm", PTQ4DMConfig, ptq4dm.quantize, "PTQ4DM: NDTC calibration, Lp scales"),
    Method("qdiffusion", QDiffusionConfig, qdiffusion.quantize, "Q-Diffusion: block reconstruction"),
    Method("ptq4dit", PTQ4DiTConfig, ptq4dit.quantize, "PTQ4DiT: CSB + SSC, then reconstruction"),
    Method("mrq", MRQConfig, mrq.quantize, "TQ-DiT's multi-region quantization alone"),
    Method("tgq", TGQConfig, tgq.quantize, "TQ-DiT's time-grouping quantization alone"),
    Method("mrq_tgq", TQDiTConfig, mrq_tgq.quantize, "TQ-DiT: MRQ + TGQ + Hessian-guided search"),
    Method("qdit", QDiTConfig, qdit.quantize, "Q-DiT: searched group sizes, dynamic activations"),
    Method("ditas", DiTASConfig, ditas.quantize, "DiTAS: temporal-aggregated smoothing, low-rank weights"),
)}


def method_of(config: MethodConfig) -> Method:
    """The method a config belongs to (by its exact class)."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    known = ", ".join(m.config_class.__name__ for m in METHODS.values())
    raise TypeError(f"{type(config).__name__} is not a method config; use one of {known}")


def quantize(model, calib, config: MethodConfig):
    """Quantize ``model`` in place with the method ``config`` belongs to; returns (model, cost).

    ``calib``: the FP calibration set (``tqdit.capture``). ``cost``: calibration seconds, peak memory
    and what the method records (quantized layers, calibration inputs, reconstruction errors).
    """
    method = method_of(config)
    if getattr(model, "quant_config", None) is not None:
        raise ValueError("the model is already quantized; quantize a fresh copy of the FP model "
                         "(copy.deepcopy before the first quantize)")
    return method.run(model, calib, config)


def config_from_settings(name: str, shared: dict, own: dict) -> MethodConfig:
    """A method's config from flat settings (the Hydra mapping): ``own`` are its own settings, where an
    unknown key is an error naming the known ones; keys of ``shared`` the method does not take are left
    out (e.g. ``time_groups`` for a method without time groups)."""
    if name not in METHODS:
        raise ValueError(f"quant={name} is unknown: choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    unknown = sorted(set(own) - set(method.own_settings))
    if unknown and not method.own_settings:
        raise ValueError(f"quant.params={own}: quant={name} takes no method parameters; remove them")
    if unknown:
        known = ", ".join(sorted(method.own_settings))
        raise ValueError(f"quant.params has unknown keys {unknown} for quant={name}; known keys: {known}")
    accepted = {f.name for f in fields(method.config_class)}
    return method.config_class(**{k: v for k, v in shared.items() if k in accepted}, **own)
