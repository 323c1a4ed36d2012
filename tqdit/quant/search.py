"""Scale search for one layer: candidate grids per quantizer and the criteria that rank them.

Criteria (``quant.search``):

- ``hessian``  TQ-DiT's Hessian-guided optimisation (PTQ4ViT's metric): minimise
  Σ (∂L/∂O ⊙ (O − Ô))² over the layer output O, alternating weight and activation rounds.
  L is chosen so its gradient is not degenerate at full precision: L = ⟨r, f(x)⟩ with a fixed
  standard-normal probe r per calibration input (see ``calibrate.py``). Then E_r[(∂L/∂O)²] is the
  diagonal of JᵀJ, the Gauss-Newton Hessian of the output error ½‖f_Q(x) − f(x)‖², so the score
  estimates how much a layer's quantization error moves the model's prediction.
- ``mse``      the same alternating search on the unweighted output error Σ (O − Ô)².
- ``lp``       each tensor's own error Σ |x − x̂|^p (Q-Diffusion / PTQ4DM style; no output needed).
- ``minmax``   no search: the full observed range.
- ``percentile`` activations clipped at the ``percentile`` and 1 − ``percentile`` quantiles.

Candidates follow PTQ4ViT: range multipliers α on a 100-point grid from 0.01 to 1.2 of the
observed range (per output channel for weights, per time group for activations); the MRQ
post-softmax split takes the 20 exponents 2^0 .. 2^-19. Where the criterion cannot rank the MRQ
post-softmax split (``minmax``, ``percentile``), the split minimises the tensor's own squared error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tqdit.quant.quantizers import GeluMRQ, SoftmaxMRQ, UniformQuantizer, fake_quant, range_to_params

OUTPUT_CRITERIA = ("hessian", "mse")
SCORED_ELEMENTS = 1 << 22  # tensor criteria score at most this many elements per activation operand
TENSOR_CRITERIA = ("lp", "minmax", "percentile")


@dataclass
class SearchConfig:
    criterion: str = "hessian"
    rounds: int = 3
    candidates: int = 100
    alpha_min: float = 0.01
    alpha_max: float = 1.2
    p: float = 2.0
    percentile: float = 0.9999
    batch: int = 32  # calibration inputs per evaluation chunk

    def __post_init__(self):
        if self.criterion not in OUTPUT_CRITERIA + TENSOR_CRITERIA:
            raise ValueError(
                f"unknown quant.search '{self.criterion}': "
                f"use one of {', '.join(OUTPUT_CRITERIA + TENSOR_CRITERIA)}"
            )

    def alphas(self) -> torch.Tensor:
        return torch.linspace(self.alpha_min, self.alpha_max, self.candidates)


def _quantile(x: torch.Tensor, q: float, max_elements: int = 1 << 22) -> torch.Tensor:
    flat = x.reshape(-1).float()
    if flat.numel() > max_elements:  # torch.quantile has a size limit; a fixed-stride subsample is enough
        flat = flat[:: flat.numel() // max_elements + 1]
    return torch.quantile(flat, q)


class Grid:
    """Candidate settings of one quantizer; ``bins`` = the quantizer's time groups or weight channels."""

    num: int
    bins: int

    def apply(self, x: torch.Tensor, k: int, groups: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def commit(self, best: torch.Tensor) -> None:
        raise NotImplementedError

    def reduce(self, per_element: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Per-bin sums of an error tensor shaped like the quantizer's input."""
        per_sample = per_element.reshape(per_element.shape[0], -1).sum(dim=1)
        return torch.zeros(self.bins, dtype=torch.float64, device=per_sample.device).index_add_(
            0, groups.to(per_sample.device), per_sample.double()
        )


class ActivationGrid(Grid):
    """Per-tensor uniform activation quantizer: candidate k scales each group's observed range by α_k."""

    def __init__(
        self,
        quantizer: UniformQuantizer,
        samples: list[torch.Tensor],
        groups: torch.Tensor,
        cfg: SearchConfig,
    ):
        self.q, self.bins = quantizer, quantizer.groups
        self.alphas = cfg.alphas()
        self.num = len(self.alphas)
        low, high = torch.zeros(self.bins), torch.zeros(self.bins)
        for g in range(self.bins):
            chosen = torch.cat([s.reshape(-1) for s, sg in zip(samples, groups.tolist()) if sg == g])
            if cfg.criterion == "percentile":
                low[g], high[g] = _quantile(chosen, 1 - cfg.percentile), _quantile(chosen, cfg.percentile)
            else:
                low[g], high[g] = chosen.min(), chosen.max()
        self.low, self.high = low, high
        # (candidates, groups) tables on the data's device: applying a candidate is a gather, never a sync
        scale, zero_point = range_to_params(
            self.alphas[:, None] * low[None],
            self.alphas[:, None] * high[None],
            quantizer.bits,
            quantizer.symmetric,
        )
        device = samples[0].device
        self.scale_table, self.zero_table = scale.to(device), zero_point.to(device)

    def apply(self, x, k, groups):
        return fake_quant(
            x, self.scale_table[k][groups], self.zero_table[k][groups], self.q.qmin, self.q.qmax, axis=0
        )

    def commit(self, best):
        alpha = torch.ones(self.bins) if best is None else self.alphas[best.cpu()]
        self.q.set_range((alpha * self.low).reshape(-1, 1), (alpha * self.high).reshape(-1, 1))


class WeightGrid(Grid):
    """Per-output-channel weight quantizer: candidate k uses α_k · max|W_c| (symmetric grid) or
    α_k · [min W_c, max W_c] (asymmetric grid, PTQ4DiT)."""

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor, cfg: SearchConfig):
        self.q, self.weight = quantizer, weight
        rows = weight.detach().reshape(weight.shape[0], -1).float()
        if quantizer.symmetric:
            self.high = rows.abs().amax(dim=1).clamp(min=1e-8)
            self.low = -self.high
        else:
            self.low, self.high = rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)
        self.alphas = cfg.alphas()
        self.num, self.bins = len(self.alphas), weight.shape[0]

    def apply(self, x, k, groups=None):
        scale, zero_point = range_to_params(
            self.alphas[k] * self.low, self.alphas[k] * self.high, self.q.bits, self.q.symmetric
        )
        return fake_quant(x, scale.to(x.device), zero_point.to(x.device), self.q.qmin, self.q.qmax, axis=0)

    def reduce(self, per_element, groups=None):
        return per_element.reshape(-1, per_element.shape[-1]).sum(dim=0).double()  # output channel = last dim

    def commit(self, best):
        device = self.high.device
        alpha = (
            torch.ones(self.bins, device=device) if best is None else self.alphas.to(device)[best.to(device)]
        )
        self.q.set_range(alpha * self.low, alpha * self.high)


class SoftmaxGrid(Grid):
    """MRQ post-softmax: candidate k is the split 2^-k, k = 0..19."""

    def __init__(self, quantizer: SoftmaxMRQ, cfg: SearchConfig):
        self.q, self.bins, self.num = quantizer, quantizer.groups, 20

    def apply(self, x, k, groups):
        return self.q.quantize(x, int(k))

    def commit(self, best):
        self.q.set_split(best.cpu())


class GeluGrid(Grid):
    """MRQ post-GELU: candidate k sets the positive step to α_k · max⁺ / (2^(b-1) − 1) per group."""

    def __init__(
        self, quantizer: GeluMRQ, samples: list[torch.Tensor], groups: torch.Tensor, cfg: SearchConfig
    ):
        self.q, self.bins = quantizer, quantizer.groups
        self.alphas = cfg.alphas()
        self.num = len(self.alphas)
        self.high = torch.zeros(self.bins)
        for g in range(self.bins):
            chosen = torch.cat([s.reshape(-1) for s, sg in zip(samples, groups.tolist()) if sg == g])
            self.high[g] = (
                _quantile(chosen, cfg.percentile) if cfg.criterion == "percentile" else chosen.max()
            )
        self.high = self.high.clamp(min=1e-6)
        self.step_table = (self.alphas[:, None] * self.high[None] / self.q.levels).to(samples[0].device)

    def apply(self, x, k, groups):
        return self.q.quantize(x, self.step_table[k][groups])

    def commit(self, best):
        alpha = torch.ones(self.bins) if best is None else self.alphas[best.cpu()]
        self.q.set_positive_scale(alpha * self.high / self.q.levels)


def make_grid(
    quantizer, data: list[torch.Tensor] | torch.Tensor, groups: torch.Tensor, cfg: SearchConfig
) -> Grid:
    if isinstance(quantizer, SoftmaxMRQ):
        return SoftmaxGrid(quantizer, cfg)
    if isinstance(quantizer, GeluMRQ):
        return GeluGrid(quantizer, data, groups, cfg)
    if quantizer.scale.shape[1] > 1:
        return WeightGrid(quantizer, data, cfg)
    return ActivationGrid(quantizer, data, groups, cfg)


def quantizer_groups(quantizer, groups: torch.Tensor) -> torch.Tensor:
    """The bins a quantizer sees for each calibration input: its time group, or 0 if it is not grouped."""
    return groups if getattr(quantizer, "groups", 1) > 1 else torch.zeros_like(groups)


# ---------------------------------------------------------------------------------------------
# One layer: operands (quantizer, FP data), the function that forms the output, and the search.
# ---------------------------------------------------------------------------------------------


@dataclass
class Operand:
    quantizer: object
    data: list[torch.Tensor] | torch.Tensor  # per-input activations, or the weight tensor
    is_weight: bool = False


@dataclass
class LayerProblem:
    """A layer to calibrate: output = combine(quantized operands) per calibration input."""

    operands: list[Operand]
    combine: object  # callable(list of operand tensors for one chunk) -> output
    grads: list[torch.Tensor] | None  # ∂L/∂O per input (hessian only)
    groups: torch.Tensor  # time group of each calibration input (long, CPU)


def linear_problem(module, inputs: list[torch.Tensor], grads, groups) -> LayerProblem:
    bias = module.bias.detach() if module.bias is not None else None
    return LayerProblem(
        operands=[
            Operand(module.weight_quant, module.weight.detach(), is_weight=True),
            Operand(module.act, inputs),
        ],
        combine=lambda ops: F.linear(ops[1], ops[0], bias),
        grads=grads,
        groups=groups,
    )


def matmul_problem(module, a: list[torch.Tensor], b: list[torch.Tensor], grads, groups) -> LayerProblem:
    return LayerProblem(operands=[Operand(module.a_quant, a), Operand(module.b_quant, b)],
                        combine=lambda ops: ops[0] @ ops[1], grads=grads, groups=groups)


def _chunks(problem: LayerProblem, batch: int):
    n = len(problem.groups)
    for start in range(0, n, batch):
        yield slice(start, min(start + batch, n))


def _stack(tensors: list[torch.Tensor], index: slice) -> torch.Tensor:
    return torch.stack(tensors[index]) if len(tensors[index]) > 1 else tensors[index][0][None]


def search_layer(problem: LayerProblem, cfg: SearchConfig, context=None) -> None:
    """Fit every quantizer of the layer (weights per channel, activations per time group)."""
    grids = [
        make_grid(op.quantizer, op.data, quantizer_groups(op.quantizer, problem.groups), cfg)
        for op in problem.operands
    ]
    if cfg.criterion in TENSOR_CRITERIA:
        for op, grid in zip(problem.operands, grids):
            _fit_tensor(op, grid, problem.groups, cfg)
        return
    for _ in range(cfg.rounds):
        for index, grid in enumerate(grids):
            device = problem.operands[-1].data[0].device
            scores = torch.zeros(
                grid.num, grid.bins, dtype=torch.float64, device=device
            )  # on the device: no sync per candidate
            for part in _chunks(problem, cfg.batch):
                groups = problem.groups[part]
                if context is not None:
                    context.set_groups(groups.to(device))
                operands = [
                    (
                        None
                        if i == index
                        else (op.quantizer(op.data) if op.is_weight else op.quantizer(_stack(op.data, part)))
                    )
                    for i, op in enumerate(problem.operands)
                ]
                raw = [op.data if op.is_weight else _stack(op.data, part) for op in problem.operands]
                reference = problem.combine(raw)
                grad = _stack(problem.grads, part) if cfg.criterion == "hessian" else None
                target = problem.operands[index]
                bins = quantizer_groups(target.quantizer, groups).to(reference.device)
                for k in range(grid.num):
                    operands[index] = grid.apply(raw[index], k, bins if not target.is_weight else None)
                    error = problem.combine(operands).sub_(reference)
                    if grad is not None:
                        error.mul_(grad)
                    per_element = error.float().square_()
                    # Weights are ranked per output channel (the last dim of the output).
                    scores[k] += (
                        grid.reduce(per_element) if target.is_weight else grid.reduce(per_element, bins)
                    )
            grid.commit(scores.argmin(dim=0).cpu())


def _fit_tensor(op: Operand, grid: Grid, groups: torch.Tensor, cfg: SearchConfig) -> None:
    """Criteria on the quantizer's own input: min-max, percentile, or the Lp error over the α grid."""
    if cfg.criterion in ("minmax", "percentile") and not isinstance(grid, SoftmaxGrid):
        grid.commit(None)
        return
    power = cfg.p if cfg.criterion == "lp" else 2.0
    device = op.data.device if op.is_weight else op.data[0].device
    scores = torch.zeros(grid.num, grid.bins, dtype=torch.float64, device=device)
    bins_all = quantizer_groups(op.quantizer, groups)
    if op.is_weight:
        for k in range(grid.num):
            error = (grid.apply(op.data, k) - op.data).abs().pow(power)
            scores[k] = error.reshape(error.shape[0], -1).sum(dim=1).double()
    else:
        # Score on at most SCORED_ELEMENTS evenly strided elements (the range itself comes from all of them):
        # the Lp error of a per-tensor grid is an average, and a strided subsample estimates it closely.
        total = sum(t.numel() for t in op.data)
        stride = max(1, -(-total // SCORED_ELEMENTS))
        for start in range(0, len(groups), cfg.batch):
            part = slice(start, min(start + cfg.batch, len(groups)))
            x, bins = _stack(op.data, part), bins_all[part].to(device)
            x = x.reshape(x.shape[0], -1)[:, ::stride]
            for k in range(grid.num):
                scores[k] += grid.reduce((grid.apply(x, k, bins) - x).abs().pow(power), bins)
    grid.commit(scores.argmin(dim=0).cpu())
