"""The layout's rules (README, "Architecture"): what each package must not import, checked on the source.

Mutations caught (each applied once, each made a test here fail): ``import hydra`` in
``tqdit/quant/config.py``; ``from tqdit.kernels import recon`` at the top of ``tqdit/quant/reconstruct.py``;
``from tqdit.quant.calibrate import calibrate`` in ``tqdit/kernels/lowbit.py``; a line of 111 characters.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tqdit"
FRAMEWORKS = ("hydra", "omegaconf", "wandb", "submitit")
CALIBRATION_STACK = (
    "tqdit.quant.calibrate",
    "tqdit.quant.capture",
    "tqdit.quant.config",
    "tqdit.quant.search",
    "tqdit.quant.reconstruct",
    "tqdit.quant.methods",
    "tqdit.quant.wrapping",
    "tqdit.quant.state",
)
# package -> module prefixes it must not import (anywhere in its files, at any depth of a function)
RULES = {
    "tqdit.models": ("tqdit.quant", "tqdit.kernels", "tqdit.pipeline", "tqdit.metrics", "tqdit.data")
    + FRAMEWORKS,
    "tqdit.diffusion": (
        "tqdit.models",
        "tqdit.quant",
        "tqdit.kernels",
        "tqdit.pipeline",
        "tqdit.data",
        "tqdit.metrics",
    )
    + FRAMEWORKS,
    "tqdit.data": ("tqdit.quant", "tqdit.kernels", "tqdit.pipeline", "tqdit.metrics") + FRAMEWORKS,
    "tqdit.quant": ("tqdit.pipeline", "tqdit.metrics", "triton") + FRAMEWORKS,
    "tqdit.kernels": CALIBRATION_STACK + ("tqdit.pipeline", "tqdit.metrics") + FRAMEWORKS,
    "tqdit.metrics": ("tqdit.quant", "tqdit.kernels", "tqdit.models", "tqdit.pipeline", "tqdit.data")
    + FRAMEWORKS,
    "tqdit.report": ("tqdit.pipeline", "tqdit.kernels", "tqdit.metrics") + FRAMEWORKS,
}
# imported only inside functions (looked up at call time), never at a module's top level
TOP_LEVEL_RULES = {"tqdit.quant": ("tqdit.kernels",)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def violations(rules: dict, top_level_only: bool) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for package, forbidden in rules.items():
            if name == package or name.startswith(package + "."):
                bad = sorted(i for i in imports(path, top_level_only)
                             if any(i == f or i.startswith(f + ".") for f in forbidden))
                found += [f"{path.relative_to(ROOT)} imports {i}" for i in bad]
    return found


def test_packages_import_only_what_the_architecture_allows():
    assert violations(RULES, top_level_only=False) == []


def test_the_algorithms_look_kernels_up_at_call_time_only():
    assert violations(TOP_LEVEL_RULES, top_level_only=True) == []


@pytest.mark.parametrize("statement, absent", [
    ("import tqdit.kernels.lowbit, tqdit.kernels.fused_attention, tqdit.kernels.recon", CALIBRATION_STACK),
    ("import tqdit.quant.methods, tqdit.quant.state", ("triton", "tqdit.kernels")),
    ("import tqdit.data.calibration, tqdit.diffusion, tqdit.metrics", ("hydra", "tqdit.quant")),
])
def test_importing_a_layer_loads_nothing_it_must_not(statement, absent):
    """The same rules at run time, in a fresh interpreter: nothing loads them indirectly either."""
    code = f"import sys; {statement}; print(sorted(m for m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    modules = eval(loaded.stdout)
    assert [m for m in modules if any(m == a or m.startswith(a + ".") for a in absent)] == []


def test_lines_fit_110_columns():
    paths = [ROOT / "run.py"] + [p for folder in ("tqdit", "tests", "benchmarks", "analysis")
                                 for p in sorted((ROOT / folder).rglob("*.py"))]
    long = [f"{path.relative_to(ROOT)}:{number}" for path in paths
            for number, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 110]
    assert long == [], f"{len(long)} lines over 110 characters"
