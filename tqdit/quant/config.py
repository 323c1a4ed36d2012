"""Settings: what a user chooses (one dataclass per method) and what the engine runs (``CalibrationConfig``).

A method's config (``TQDiTConfig``, ``PTQ4DiTConfig``, ... in ``tqdit/quant/methods/``) subclasses
``MethodConfig``: the settings every method shares, plus its own. It validates itself when built: a
setting the method cannot honour is a ``ValueError`` naming the fix, never silently replaced. The
method then states its fixed choices (multi-region quantizers, weight grid symmetry, the scale rule)
in the ``CalibrationConfig`` it hands to the engine; that one is saved with the calibrated parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from tqdit.quant.reconstruct import ReconConfig
from tqdit.quant.search import SearchConfig

# Activation operands by position in a DiT block (see ``wrapping.activation_positions``).
POSITIONS = (
    "post_norm",
    "attn_out",
    "post_gelu",
    "post_silu",
    "timestep_freq",
    "q",
    "k",
    "post_softmax",
    "v",
)
BIT_WIDTHS = (2, 3, 4, 5, 6, 7, 8, 16)  # 16: the quantization path as a near no-op check
# published: each method's own operand set and post-softmax width (its code's); shared: the same operands
# at the same bits for every method (scope "blocks", post-softmax at a_bits), for ablations.
PROTOCOLS = ("published", "shared")
SHARED_SCOPE = "blocks"


@dataclass
class CalibrationConfig:
    """What the calibration engine runs: a method's settings with its fixed choices filled in."""

    w_bits: int = 8
    a_bits: int = 8
    softmax_bits: int | None = None  # the post-softmax operand's width; None: a_bits
    eight_bit_roles: tuple = ()  # roles kept at ≥ 8 bits (PTQ4DM's first and last layer)
    runtime_scaled_roles: tuple = ()  # roles whose input is multiplied by a factor at run time (PTQ4DiT)
    weight_symmetric: bool = True  # per-output-channel weight grids: symmetric, or asymmetric (PTQ4DiT)
    scope: str | list = "blocks"
    multi_region: bool = False
    time_groups: int = 1
    grouped: str | list = "all"  # activation positions with per-group parameters (see POSITIONS)
    search: SearchConfig = field(default_factory=SearchConfig)
    num_inputs: int = 256  # calibration inputs in all, split evenly over the time groups (at least 1 each)
    capture_batch: int = 32
    seed: int = 0
    recon: ReconConfig = field(default_factory=ReconConfig)  # block reconstruction (Q-Diffusion, PTQ4DiT)
    params: dict = field(default_factory=dict)  # the method's own settings, as recorded in results
    error_model: str = "round"  # round: quantize; noise: add noise of the grid's step (the noise control)
    # Grids computed from the tensors themselves (Q-DiT, DiTAS); the defaults are the calibrated grids above.
    weight_grid: str = "channel"  # channel (searched) | input_groups (Q-DiT) | strided (DiTAS's code)
    activation_grid: str = "static"  # static (calibrated) | token_groups (Q-DiT, dynamic) | sample (DiTAS)
    group_size: int = 128  # weight/activation group size of input_groups/token_groups; strided: elements
    low_rank: int = 0  # rank of DiTAS's floating-point low-rank weight term (0: none)
    smoothing: bool = False  # DiTAS: per-channel smoothing factors on the Linear inputs


def _fail(config, message: str) -> None:
    raise ValueError(f"{type(config).__name__}: {message}")


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Settings every method shares. Subclasses add their own and state what they fix."""

    w_bits: int = 8
    a_bits: int = 8
    # Which operands, at which widths. ``protocol`` fills what is left None: "published" the method's own
    # (``published_scope``, ``published_softmax_bits``: its released code's), "shared" the same for every
    # method (scope "blocks", post-softmax at a_bits). A value given here is used under either protocol.
    protocol: str = "published"
    scope: str | list | None = None  # a named scope (see ``wrapping.SCOPES``) or module-name patterns
    softmax_bits: int | None = None  # bits of the post-softmax operand (attention probabilities)
    num_inputs: int = 256  # calibration inputs the scale search sees (split evenly over time groups)
    capture_batch: int = 32  # inputs per forward/backward pass while capturing layer data
    seed: int = 0  # which calibration inputs are drawn, and the Hessian probes
    search: SearchConfig = field(default_factory=SearchConfig)

    # Class-level facts about the method (not settings): the scale rule its paper fixes, if any, and
    # whether its grids are computed at run time (no 8-bit kernel or fused attention for them: simulated).
    fixed_search = None
    runtime_grids = False
    published_scope = SHARED_SCOPE  # the layers its released code quantizes, as a scope
    published_softmax_bits = None  # its code's post-softmax width whatever a_bits is (None: a_bits)
    published_eight_bit_roles = ()  # roles its code keeps at 8 bits whatever the widths

    def __post_init__(self):
        for key in ("w_bits", "a_bits"):
            value = getattr(self, key)
            if isinstance(value, bool) or value not in BIT_WIDTHS:
                _fail(
                    self, f"{key}={value} must be an integer bit width from 2 to 8 (or 16 as a no-op check)"
                )
        if self.protocol not in PROTOCOLS:
            _fail(self, f"protocol={self.protocol!r} is unknown: use {' or '.join(PROTOCOLS)}")
        if self.softmax_bits is not None and (
            isinstance(self.softmax_bits, bool) or self.softmax_bits not in BIT_WIDTHS
        ):
            _fail(self, f"softmax_bits={self.softmax_bits} must be a bit width from 2 to 8, 16, or None "
                        "(the protocol's choice)")
        for key in ("num_inputs", "capture_batch"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                _fail(self, f"{key}={getattr(self, key)} must be a positive integer")
        if not isinstance(self.search, SearchConfig):
            _fail(self, f"search={self.search!r} must be a SearchConfig(criterion=...)")
        if self.fixed_search and self.search.criterion != self.fixed_search:
            _fail(
                self,
                f"search={self.search.criterion}: this method chooses its scales by {self.fixed_search} "
                f"as its paper does; leave search at its default or use UniformConfig",
            )

    def operand_scope(self) -> str | list:
        """The scope this config quantizes: ``scope``, else the protocol's."""
        if self.scope is not None:
            return self.scope
        return self.published_scope if self.protocol == "published" else SHARED_SCOPE

    def operand_softmax_bits(self) -> int:
        """The post-softmax operand's width: ``softmax_bits``, else the protocol's. A published width is a
        floor: the code's ``--sm_abit 8`` kept probabilities at 8 bits below A8, and A16 (the near no-op
        check) stays A16."""
        if self.softmax_bits is not None:
            return self.softmax_bits
        published = self.published_softmax_bits if self.protocol == "published" else None
        return self.a_bits if published is None else max(published, self.a_bits)

    def operand_eight_bit_roles(self) -> tuple:
        """Roles kept at 8 bits under this protocol (published: the method's code's; shared: none)."""
        return tuple(self.published_eight_bit_roles) if self.protocol == "published" else ()

    def own_settings(self) -> dict:
        """The method's own settings (fields beyond MethodConfig's), as results record them."""
        shared = {f.name for f in fields(MethodConfig)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in shared | {"recon"}
                and f.name not in ("time_groups", "grouped")}

    def calibration(self, **fixed) -> CalibrationConfig:
        """The engine's settings: the shared ones, the method's ``fixed`` choices, its own as ``params``."""
        settings = {f.name: getattr(self, f.name) for f in fields(MethodConfig) if f.name != "protocol"}
        settings.update(scope=self.operand_scope(), softmax_bits=self.operand_softmax_bits(),
                        eight_bit_roles=self.operand_eight_bit_roles())
        own = {f.name for f in fields(self)}
        for key in ("time_groups", "grouped", "recon"):
            if key in own:
                settings[key] = getattr(self, key)
        return CalibrationConfig(**{**settings, **fixed}, params=self.own_settings())

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class TimeGroupedConfig(MethodConfig):
    """Methods with per-time-group activation parameters (TGQ, TQ-DiT)."""

    time_groups: int = 10  # G: contiguous, equal groups of sampling steps (TQ-DiT's code uses 10)
    grouped: str | list = "all"  # activation positions with per-group parameters (POSITIONS)

    def __post_init__(self):
        super().__post_init__()
        if (
            isinstance(self.time_groups, bool)
            or not isinstance(self.time_groups, int)
            or self.time_groups < 1
        ):
            _fail(
                self,
                f"time_groups={self.time_groups} must be a positive integer (at most the sampling steps)",
            )
        positions = [self.grouped] if isinstance(self.grouped, str) else list(self.grouped)
        unknown = sorted(set(positions) - set(POSITIONS) - {"all"})
        if unknown:
            _fail(self, f"grouped has unknown positions {unknown}; choose from all, {', '.join(POSITIONS)}")


@dataclass(frozen=True, kw_only=True)
class ReconstructingConfig(MethodConfig):
    """Methods that end with block reconstruction (Q-Diffusion, PTQ4DiT)."""

    recon: ReconConfig = field(default_factory=ReconConfig)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.recon, ReconConfig):
            _fail(self, f"recon={self.recon!r} must be a ReconConfig(...)")
        if any(not isinstance(v, int) or v < 0 for v in (self.recon.iters, self.recon.act_iters)):
            _fail(self, "recon.iters and recon.act_iters must be integers ≥ 0")
        if self.recon.batch < 1:
            _fail(self, "recon.batch must be ≥ 1")
