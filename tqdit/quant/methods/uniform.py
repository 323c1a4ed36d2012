"""``uniform``: plain uniform PTQ — the baseline that TQ-DiT's components are measured against.

Weights: symmetric, per output channel. Activations: one asymmetric (symmetric for q, k, v)
per-tensor quantizer per operand, no time groups, no multi-region quantizers. The scale choice
is ``search``: ``minmax``, ``percentile`` or ``lp`` (each tensor's own Lp error over the α grid;
p = ``search.p``, 2 by default = MSE; the default here), and also the output-level ``mse``/``hessian``.
"""

from dataclasses import dataclass, field

from tqdit.quant.calibrate import calibrate
from tqdit.quant.config import MethodConfig
from tqdit.quant.search import SearchConfig


@dataclass(frozen=True, kw_only=True)
class UniformConfig(MethodConfig):
    # tqdit's own baseline: the first row of TQ-DiT's ablation (uniform → +MRQ → +TGQ), so under the
    # published protocol it quantizes TQ-DiT's operands, as its parts do (the noise control follows it)
    published_scope = "tq_dit_code"
    search: SearchConfig = field(default_factory=lambda: SearchConfig(criterion="lp"))


def quantize(model, calib, config: UniformConfig):
    return calibrate(model, calib, config.calibration(multi_region=False))
