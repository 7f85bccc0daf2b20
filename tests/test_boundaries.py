"""vae_core is the library: it must run where prefect, ray and mlflow are not installed."""

import subprocess
import sys

FORBIDDEN = ("prefect", "ray", "mlflow")


def test_vae_core_imports_no_orchestration_packages():
    code = (
        "import sys, pkgutil, importlib, vae_core\n"
        "for m in pkgutil.walk_packages(vae_core.__path__, 'vae_core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"vae_core pulled in: {out.stdout.strip()}"
