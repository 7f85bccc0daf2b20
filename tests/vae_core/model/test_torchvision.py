"""torchvision must import and its pure-Python parts run, with or without its compiled extension."""

import subprocess
import sys
import textwrap

import pytest
import torch

from vae_core.model.tv import import_torchvision


def test_torchvision_pure_python_parts_run():
    tv = import_torchvision()
    from torchvision.transforms import v2

    net = tv.models.resnet18(weights=None, num_classes=7).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    pipeline = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize((16, 16))])
    out = pipeline(torch.full((3, 8, 8), 255, dtype=torch.uint8))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and out.max().item() == pytest.approx(1.0)
    g = tv.utils.make_grid(torch.rand(6, 1, 8, 8), nrow=3, padding=2)
    assert g.shape == (3, 2 + 2 * 10, 2 + 3 * 10)


def _run(code: str, extra_path: str | None = None) -> str:
    env_code = f"import sys; sys.path.insert(0, {extra_path!r})\n" if extra_path else ""
    out = subprocess.run([sys.executable, "-c", env_code + textwrap.dedent(code)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_working_torchvision_is_left_untouched(tmp_path):
    # A torchvision that imports cleanly (as a matching build does) must get no schemas defined for it.
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("MARK = 'real'\n")
    out = _run(
        """
        import torch
        from vae_core.model.tv import import_torchvision, shim_active
        tv = import_torchvision()
        print(tv.MARK, shim_active(), hasattr(torch.ops.torchvision, 'nms'))
        """,
        str(tmp_path),
    )
    assert out == "real False False"


def test_unrelated_import_errors_are_not_swallowed(tmp_path):
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('something else broke')\n")
    out = _run(
        """
        from vae_core.model.tv import import_torchvision
        try:
            import_torchvision()
        except RuntimeError as e:
            print('raised', e)
        """,
        str(tmp_path),
    )
    assert out == "raised something else broke"
