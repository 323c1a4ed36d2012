"""``qdit``: Q-DiT (Chen et al., CVPR 2025, arXiv 2406.17343; code Juanerx/Q-DiT) on DiT.

Paper vs released code vs tqdit:
- **Group quantization** of weights: each output row split into contiguous groups of g input channels,
  one asymmetric min/max grid per group, round to nearest, no clipping (code: ``max`` method, asymmetric
  by default; g must divide in_features, as the code asserts). Followed.
- **Sample-wise dynamic activation quantization**: the paper computes activation parameters per sample
  and timestep at run time; the code computes them per *token* and per group of g input channels
  (asymmetric min/max), which is finer. tqdit follows the code (``DynamicQuantizer(token_groups)``):
  nothing about activations is calibrated, and no sample's grid depends on its batch.
- **Automatic granularity allocation**: an evolutionary search of one group size per quantized Linear
  (the code searches with symmetric weight and activation grids, ``--w_sym --a_sym``, then quantizes
  asymmetrically; tqdit searches with the grids it ends with),
  as the code runs it (``evolution.sh``): search space {32, 64, 128, 192, 288} (per layer, the sizes that
  divide its input width), population 50, 10 generations, top 10 kept as parents, 25 mutations (each
  gene resampled with probability 0.1) and 25 uniform crossovers per generation, then random candidates
  up to the population; no candidate evaluated twice; the first population holds the all-128 candidate.
  Budget: the code's, mean group size ≥ 128 (the paper states a BitOps budget; the code never computes
  one). Fitness: the paper's and code's FID of 800 samples (a fixed seed, the same for every candidate);
  the code scores against the ADM reference batch with DDIM 50 steps and no guidance. tqdit scores with
  ``score`` (a function model → FID the caller supplies: the job uses its own sampler, reference and
  feature network, i.e. the protocol the result is measured under), keeping the methods free of metrics.
  The code's selection step (``update_top_k``) is called but not defined; tqdit keeps the k lowest
  FIDs of all candidates so far, as the search framework it came from does.
- The gene sets a layer's weight *and* input-activation group size (the paper's intent); the code binds
  the activation size before the search, so there only weight sizes vary (not reproduced).
- Cheaper preset (documented, not the paper's): ``fitness="output_mse"``: the mean squared error of the
  quantized model's prediction against FP on ``num_inputs`` calibration inputs, no sampling;
  ``generations=0`` skips the search (every layer at ``group_size``: the paper's "+ group 128 + dynamic"
  ablation row).
- **Final weight rounding: GPTQ**, as the released main script runs it (``quant_main.sh --use_gptq``;
  the paper's method section describes round-to-nearest groups, and its search scores round-to-nearest
  candidates): per DiT block in order, each Linear's Hessian 2·X̂ᵀX̂/n from its dynamically quantized
  inputs in the model quantized so far, GPTQ with blocks of 128 columns, 1 % damping, no reordering, a
  grid per group that includes 0; the code uses block 0's group size for every layer, tqdit each layer's
  own. The code's GPTQ pass also finds and rounds the adaLN Linear (its round-to-nearest path leaves it
  in floating point). Its calibration data: 256 inputs of 50-step DDIM runs with guidance 1.5
  (conditional halves, one random step each); tqdit: ``num_inputs`` inputs of the shared calibration
  set. ``weight_rounding="rtn"`` keeps round to nearest (the paper's ablation rows).
- Scope: the code quantizes only qkv, proj, fc1 and fc2, tqdit's ``gemms`` (``protocol=published``);
  under the shared ``scope=blocks`` the adaLN Linear is a gene too, and the attention operands get the
  dynamic per-token grid.
Published (DiT-XL/2 256, 100 steps, cfg 1.5, 10k samples; FID/sFID/IS/precision): FP 5.31/17.61/245.85/0.8077,
PTQ4DiT W4A8 7.75/22.01/190.38/0.7292, Q-DiT W4A8 6.40/18.60/211.72/0.7609; W6A8 FID 5.32.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from tqdit.models.adapters import family_of
from tqdit.quant.calibrate import by_unit, calibration_cost, draw_inputs, start_cost
from tqdit.quant.config import MethodConfig
from tqdit.quant.search import SearchConfig
from tqdit.quant.layers import QuantLinear, quantization_disabled
from tqdit.quant.wrapping import wrap

FITNESS = ("fid", "output_mse")


@dataclass(frozen=True, kw_only=True)
class QDiTConfig(MethodConfig):
    runtime_grids = True  # dynamic activation grids: simulated quantization only
    published_scope = "gemms"  # its code quantizes qkv, proj, fc1 and fc2 only
    fixed_search = "minmax"  # every grid is the min/max of its group, computed from the tensor itself
    search: SearchConfig = field(default_factory=lambda: SearchConfig(criterion="minmax"))
    group_size: int = 128  # the all-g start and the budget: mean group size ≥ group_size
    group_sizes: list = field(default_factory=lambda: [32, 64, 128, 192, 288])  # the search space
    generations: int = 10  # 0: no search, every layer at group_size
    population: int = 50
    parents: int = 10  # the top-k kept
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    fitness: str = "fid"  # fid (paper, needs score) | output_mse (cheap preset)
    fitness_samples: int = 800  # samples the caller's FID score draws (the paper's 800)
    fitness_seed: int = 1234  # the same noise and labels for every candidate (the code's seed)
    weight_rounding: str = "gptq"  # gptq (the released script) | rtn (round to nearest, as in the search)
    # model -> FID of ``fitness_samples`` samples (lower is better); supplied by the caller, not a setting
    score: Callable | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        sizes = list(self.group_sizes)
        if not sizes or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in sizes):
            raise ValueError(f"QDiTConfig: group_sizes={sizes} must be positive integers")
        if self.group_size not in sizes:
            raise ValueError(f"QDiTConfig: group_size={self.group_size} must be one of group_sizes={sizes} "
                             "(the search starts from it)")
        for key in ("generations", "mutations", "crossovers"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"QDiTConfig: {key}={getattr(self, key)} must be an integer ≥ 0")
        for key in ("population", "fitness_samples"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"QDiTConfig: {key}={getattr(self, key)} must be a positive integer")
        if not 2 <= self.parents <= self.population:
            raise ValueError(f"QDiTConfig: parents={self.parents} must be between 2 and population="
                             f"{self.population}")
        if not 0 <= self.mutation_prob <= 1:
            raise ValueError(f"QDiTConfig: mutation_prob={self.mutation_prob} must be in [0, 1]")
        if self.weight_rounding not in ("gptq", "rtn"):
            raise ValueError(f"QDiTConfig: weight_rounding={self.weight_rounding} is unknown: use gptq or "
                             "rtn")
        if self.fitness not in FITNESS:
            raise ValueError(f"QDiTConfig: fitness={self.fitness} is unknown: use {' or '.join(FITNESS)}")

    def own_settings(self) -> dict:
        return {k: v for k, v in super().own_settings().items() if k != "score"}


def valid_sizes(width: int, sizes: list[int]) -> list[int]:
    """The group sizes that divide a layer's input width (Q-DiT's code asserts divisibility)."""
    return [g for g in sizes if width % g == 0]


def evolve(choices: list[list[int]], fitness: Callable[[tuple], float], config: QDiTConfig,
           start: tuple, progress: bool = True) -> tuple[tuple, list[dict]]:
    """Q-DiT's evolutionary search: the candidate (one size per layer from ``choices``) of lowest
    ``fitness`` under the budget mean ≥ ``config.group_size``; returns it and one record per generation.

    Seeded by ``config.seed``; ``start`` (every layer at group_size) is in the first population."""
    rng = random.Random(config.seed)
    budget = config.group_size
    scores: dict[tuple, float] = {}

    def admissible(candidate: tuple) -> bool:
        return sum(candidate) / len(candidate) >= budget and candidate not in scores

    def fill(new: list, target: int, make: Callable[[], tuple]) -> None:
        """Add up to ``target`` new admissible candidates, giving up after 10 tries each (as the code)."""
        wanted = len(new) + target
        for _ in range(10 * target):
            if len(new) >= wanted:
                return
            candidate = make()
            if admissible(candidate) and candidate not in new:
                new.append(candidate)

    def random_candidate() -> tuple:
        return tuple(rng.choice(c) for c in choices)

    def evaluate(candidates: list, generation: int) -> None:
        for candidate in tqdm(candidates, desc=f"q-dit generation {generation}", disable=not progress,
                              leave=False):
            scores[candidate] = float(fitness(candidate))

    history = []
    population = [start]
    fill(population, config.population - 1, random_candidate)
    evaluate(population, 0)
    for generation in range(config.generations + 1):
        if generation > 0:
            parents = sorted(scores, key=scores.get)[: config.parents]

            def mutate() -> tuple:
                parent = rng.choice(parents)
                return tuple(rng.choice(c) if rng.random() < config.mutation_prob else g
                             for g, c in zip(parent, choices))

            def cross() -> tuple:
                first, second = rng.sample(parents, 2)
                return tuple(rng.choice((a, b)) for a, b in zip(first, second))

            new: list = []
            fill(new, config.mutations, mutate)
            if len(parents) >= 2:
                fill(new, config.crossovers, cross)
            fill(new, config.population - len(new), random_candidate)
            evaluate(new, generation)
        best = min(scores, key=scores.get)
        history.append({"generation": generation, "evaluated": len(scores), "best": round(scores[best], 6),
                        "mean_group_size": round(sum(best) / len(best), 2)})
        if generation == config.generations:
            break
    return min(scores, key=scores.get), history


def set_group_sizes(model, names: list[str], sizes: tuple) -> None:
    """Each layer's weight and input-activation group size; weights re-quantized once."""
    for name, size in zip(names, sizes):
        layer = model.get_submodule(name)
        layer.weight_quant.set_group_size(size)
        layer.act.set_group_size(size)
        layer.freeze()


def output_mse(model, x, t, y, batch: int) -> Callable[[], float]:
    """The cheap fitness: mean squared error of the model's prediction against FP on (x, t, y)."""
    family = family_of(model)
    with torch.no_grad(), quantization_disabled(model):
        reference = [family.predict(model, x[i:i + batch], t[i:i + batch], y[i:i + batch]).float()
                     for i in range(0, len(t), batch)]

    def score() -> float:
        with torch.no_grad():
            errors = [(family.predict(model, x[i:i + batch], t[i:i + batch], y[i:i + batch]).float()
                       - ref).square().sum() for i, ref in zip(range(0, len(t), batch), reference)]
        return float(torch.stack(errors).sum()) / sum(r.numel() for r in reference)

    return score


def group_grid(weights: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's asymmetric grid for a group of columns (rows × g): per row, a range that includes 0."""
    low = weights.amin(dim=1).clamp(max=0)
    high = weights.amax(dim=1).clamp(min=0)
    flat = low == high
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scale = (high - low) / (2**bits - 1)
    return scale, torch.round(-low / scale)


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, block: int = 128,
               damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al. 2023) as Q-DiT's code runs it: columns rounded in order, each one's error
    spread over the columns not yet rounded through the inverse Hessian's Cholesky factor, in blocks of
    ``block`` columns; a new group grid (``group_grid``) at every ``group``-th column, from the weights
    as updated up to the current block (the reference implementation's order); damping 1 % of the mean
    diagonal; no reordering. Returns the rounded weight (dequantized)."""
    weight = weight.detach().double().clone()
    hessian = hessian.double().clone()
    columns = weight.shape[1]
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += damp * hessian.diagonal().mean() * torch.eye(columns, dtype=hessian.dtype,
                                                            device=hessian.device)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    rounded = torch.zeros_like(weight)
    qmax = 2**bits - 1
    scale = zero = None
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part, errors = weight[:, start:end].clone(), torch.zeros_like(weight[:, start:end])
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group == 0:
                scale, zero = group_grid(weight[:, column:column + group], bits)
            codes = torch.clamp(torch.round(part[:, i] / scale) + zero, 0, qmax)
            rounded[:, column] = (codes - zero) * scale
            error = (part[:, i] - rounded[:, column]) / local[i, i]
            part[:, i:] -= error[:, None] * local[i, i:][None, :]
            errors[:, i] = error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return rounded


@torch.no_grad()
def apply_gptq(model, linears: list[str], x, t, y, batch: int, bits: int) -> None:
    """Q-DiT's final weight rounding: block by block (a unit at a time), the Hessian 2·X̂ᵀX̂/n of each Linear
    from its dynamically quantized inputs in the model as quantized so far (earlier units already rounded),
    then GPTQ with the layer's own group size; the rounded weights replace the layer's weights."""
    family = family_of(model)
    for unit, members in tqdm(by_unit(model, linears).items(), desc="q-dit gptq", unit="unit"):
        sums = {name: [0.0, 0] for name in members}

        def collect(name):
            def hook(module, args, output):
                rows = output.detach().double().reshape(-1, output.shape[-1])
                sums[name][0] = sums[name][0] + rows.T @ rows
                sums[name][1] += rows.shape[0]
            return hook

        handles = [model.get_submodule(name).act.register_forward_hook(collect(name)) for name in members]
        for name in members:  # as the code: the unit's own weights unrounded while its inputs are recorded
            model.get_submodule(name)._frozen_weight = model.get_submodule(name).weight.detach()
        try:
            for start in range(0, len(t), batch):
                family.predict(model, x[start:start + batch], t[start:start + batch], y[start:start + batch])
        finally:
            for handle in handles:
                handle.remove()
        for name in members:
            layer = model.get_submodule(name)
            total, count = sums[name]
            rounded = gptq_round(layer.weight, 2 * total / count, bits, int(layer.weight_quant.group_size))
            layer.weight.copy_(rounded.to(layer.weight.dtype))
            layer.weight_quant.rounded_offline.fill_(True)
            layer.weight_quant.refresh()
            layer.freeze()


def quantize(model, calib, config: QDiTConfig):
    if config.fitness == "fid" and config.generations > 0 and config.score is None:
        raise ValueError("QDiTConfig: fitness=fid needs score=a function(model) -> FID of fitness_samples "
                         "samples; or use fitness=output_mse (the cheap preset) or generations=0")
    device = next(model.parameters()).device
    start = start_cost(device)
    model.requires_grad_(False)
    cfg = config.calibration(weight_grid="input_groups", activation_grid="token_groups",
                             group_size=config.group_size)
    names = wrap(model, cfg, calib.timesteps.numpy())
    linears = [n for n in names if isinstance(model.get_submodule(n), QuantLinear)]
    for name in names:  # enable the run-time grids (nothing to calibrate)
        module = model.get_submodule(name)
        quantizers = (module.act, module.weight_quant) if isinstance(module, QuantLinear) else (
            module.a_quant, module.b_quant)
        for quantizer in quantizers:
            quantizer.refresh()
    widths = [model.get_submodule(n).weight.shape[1] for n in linears]
    choices = [valid_sizes(w, list(config.group_sizes)) for w in widths]
    bad = [n for n, c in zip(linears, choices) if config.group_size not in c]
    if bad:
        raise ValueError(f"QDiTConfig: group_size={config.group_size} does not divide the input width of "
                         f"{bad[0]} ({widths[linears.index(bad[0])]}); choose a group_size that divides "
                         "every quantized layer's input width")
    if config.generations > 0 and not any(max(c) > config.group_size for c in choices):
        raise ValueError(
            f"QDiTConfig: no quantized layer of this model admits a group size above group_size="
            f"{config.group_size} among group_sizes={list(config.group_sizes)} (input widths "
            f"{sorted(set(widths))}), so under the budget (mean ≥ group_size) the search has one candidate: "
            "use quant=qdit_embedded for the embedded model, a smaller group_size, or generations=0")
    start_candidate = tuple(config.group_size for _ in linears)
    history: list = []
    chosen = start_candidate
    searches_on_inputs = config.generations > 0 and config.fitness == "output_mse"
    uses_inputs = config.weight_rounding == "gptq" or searches_on_inputs
    x, t, y = draw_inputs(model, calib, config.num_inputs, config.seed)  # one draw for the search and GPTQ
    if config.generations > 0:
        if config.fitness == "output_mse":
            score = output_mse(model, x, t, y, config.capture_batch)
        else:
            def score() -> float:
                return config.score(model)

        def fitness(candidate: tuple) -> float:
            set_group_sizes(model, linears, candidate)
            return score()

        chosen, history = evolve(choices, fitness, config, start_candidate)
    set_group_sizes(model, linears, chosen)
    if config.weight_rounding == "gptq":
        apply_gptq(model, linears, x, t, y, config.capture_batch, config.w_bits)
        model.quant_modified_parameters = [f"{name}.weight" for name in linears]
    return model, calibration_cost(start, device, len(names), len(t) if uses_inputs else 0,
                                   group_sizes=dict(zip(linears, chosen)), search_history=history)
