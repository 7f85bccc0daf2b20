"""The house's rules: what each wing may import, checked from the code's own import statements.

Every `import` and `from ... import` in `vae_core/` and `flows/` counts, those inside functions included
(a late import is still a dependency). A broken rule fails naming each offending file:line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("prefect", "ray", "mlflow")
SUB_PACKAGES = tuple(sorted(f"vae_core.{p.name}" for p in (ROOT / "vae_core").iterdir()
                            if p.is_dir() and not p.name.startswith(("_", "."))))
STAGE_FLOWS = tuple(sorted(f"flows/{p.name}" for p in (ROOT / "flows").glob("*.py")))
# What a request or result is typed and validated with, declared beside the code it configures: the strict
# base model and overrides (model.config), the gate's metric choice (evaluation.gate), and a source's format
# choices, size limits and URL rule (data.sources). Anything else a request needs belongs to the top level.
REQUEST_TYPES = ("vae_core.model.config", "vae_core.evaluation.gate", "vae_core.data.sources.formats",
                 "vae_core.data.sources.limits", "vae_core.data.sources.remote")


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository, with '/'
    line: int
    module: str  # what is imported, dotted and absolute ("a.b.c" for `from a.b import c`)


def _package(file: str) -> list[str]:
    """The package a module file belongs to, as name parts ("vae_core/data/x.py" -> ["vae_core", "data"])."""
    return file.removesuffix(".py").split("/")[:-1]


def imports_of(path: Path) -> list[Import]:
    """Every import statement of one file, relative ones made absolute."""
    return imports_in(path.read_text(), path.relative_to(ROOT).as_posix())


def imports_in(text: str, file: str) -> list[Import]:
    """Every import statement of `text`, the source of `file`, at any depth (in functions too)."""
    found = []
    for node in ast.walk(ast.parse(text, file)):
        if isinstance(node, ast.Import):
            found += [Import(file, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = _package(file)[: len(_package(file)) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [Import(file, node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


ALL = [i for folder in ("vae_core", "flows") for path in sorted((ROOT / folder).rglob("*.py"))
       for i in imports_of(path)]


def under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@dataclass(frozen=True)
class Rule:
    """Files under `where` (path prefixes), except those under `exempt`, import nothing under `forbidden`
    (dotted prefixes) other than what is under `allowed`."""

    says: str
    where: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()

    def offences(self) -> list[str]:
        return [f"{i.file}:{i.line} imports {i.module}" for i in ALL
                if i.file.startswith(self.where) and not i.file.startswith(self.exempt)
                and under(i.module, self.forbidden) and not under(i.module, self.allowed)]


RULES = {
    "vae_core-runs-without-orchestration": Rule(
        "vae_core never imports prefect, ray, mlflow or flows", ("vae_core/",), (*FORBIDDEN, "flows")),
    "top-level-is-the-ground-floor": Rule(
        "the top-level modules but requests and results (errors, settings, names, storage) import no "
        "sub-package of vae_core",
        tuple(f"vae_core/{p.name}" for p in (ROOT / "vae_core").glob("*.py")), SUB_PACKAGES,
        exempt=("vae_core/requests.py", "vae_core/results.py")),
    "requests-import-only-their-types": Rule(
        "requests and results import of the sub-packages only the types they are validated with",
        ("vae_core/requests.py", "vae_core/results.py"), SUB_PACKAGES, allowed=REQUEST_TYPES),
    "model-stands-alone": Rule(
        "model imports neither data, training nor evaluation, and no pyarrow", ("vae_core/model/",),
        ("vae_core.data", "vae_core.training", "vae_core.evaluation", "pyarrow")),
    "data-is-below-the-requests": Rule(
        "data imports neither training, evaluation nor ingestion, nor the requests and results (which import "
        "its source formats)", ("vae_core/data/",),
        ("vae_core.training", "vae_core.evaluation", "vae_core.ingestion", "vae_core.requests", "vae_core.results")),
    "ingestion-only-ingests": Rule(
        "ingestion imports nothing of model, training or evaluation", ("vae_core/ingestion/",),
        ("vae_core.model", "vae_core.training", "vae_core.evaluation")),
    "nothing-in-vae_core-runs-an-ingestion": Rule(
        "nothing in vae_core imports ingestion but ingestion itself", ("vae_core/",), ("vae_core.ingestion",),
        exempt=("vae_core/ingestion/",)),
    "training-never-evaluates": Rule(
        "training never imports evaluation", ("vae_core/training/",), ("vae_core.evaluation",)),
    "evaluation-never-trains": Rule(
        "evaluation never imports training", ("vae_core/evaluation/",), ("vae_core.training",)),
    "only-tracking-imports-mlflow": Rule(
        "only flows/tracking/ imports mlflow", ("vae_core/", "flows/"), ("mlflow",), exempt=("flows/tracking/",)),
    "tracking-is-mlflow-only": Rule(
        "flows/tracking/ imports neither prefect nor ray", ("flows/tracking/",), ("prefect", "ray")),
    "only-distributed-and-stage-flows-import-ray": Rule(
        "only flows/distributed/ and the stage flows (flows/*.py) import ray", ("vae_core/", "flows/"), ("ray",),
        exempt=("flows/distributed/", *STAGE_FLOWS)),
    "distributed-never-imports-prefect": Rule(
        "flows/distributed/ never imports prefect", ("flows/distributed/",), ("prefect",)),
    "stack-starts-services-only": Rule(
        "flows/stack/ imports no stage flow and no other wing of flows", ("flows/stack/",), ("flows",),
        allowed=("flows.stack",)),
    "cli-is-the-top": Rule(
        "nothing under vae_core or flows imports flows.cli but flows/cli itself", ("vae_core/", "flows/"),
        ("flows.cli",), exempt=("flows/cli/",)),
}


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_rule(rule: Rule):
    offences = rule.offences()
    assert not offences, f"rule broken: {rule.says}\n" + "\n".join(offences)


def test_the_rules_read_every_wing_and_imports_inside_functions():
    """The checks read what they claim to: each wing's files, and an import at any depth, relative or not."""
    files = {i.file for i in ALL}
    wings = [p.relative_to(ROOT).as_posix() + "/" for top in ("vae_core", "flows") for p in (ROOT / top).iterdir()
             if (p / "__init__.py").exists()]
    assert len(wings) >= 9
    for wing in wings:
        assert any(f.startswith(wing) for f in files), wing
    text = "import os\n\ndef f():\n    if True:\n        import ray.data\n        from ..model import vae\n"
    assert imports_in(text, "vae_core/data/x.py") == [
        Import("vae_core/data/x.py", 1, "os"), Import("vae_core/data/x.py", 5, "ray.data"),
        Import("vae_core/data/x.py", 6, "vae_core.model.vae")]


def test_vae_core_imports_no_orchestration_packages():
    """vae_core must run where prefect, ray and mlflow are not installed: importing every module pulls none in."""
    code = (
        "import sys, pkgutil, importlib, vae_core\n"
        "for m in pkgutil.walk_packages(vae_core.__path__, 'vae_core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"vae_core pulled in: {out.stdout.strip()}"
