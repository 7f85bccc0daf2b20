import pytest
from pydantic import ValidationError

from vae_core.errors import ConfigError
from vae_core.model.config import ModelConfig, TrainConfig, VAEConfig, list_presets, load_config


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_loads_and_builds(preset):
    import torch

    from vae_core import ConvVAE

    cfg = load_config(preset)
    assert cfg.name == preset
    model = ConvVAE(cfg.model).eval()
    images = torch.randint(0, 256, (2, *cfg.model.input_shape), dtype=torch.uint8)
    posterior = model.encode(model.prepare_eval(images))
    assert posterior.mean.shape == posterior.logvar.shape == (2, model.latent_dim)
    recon = model.reconstruct(images)
    assert recon.shape == images.shape and 0 <= recon.min() <= recon.max() <= 1


def test_presets_cover_mnist_and_rgb64():
    assert load_config("mnist").model.input_shape == (1, 28, 28)
    assert load_config("rgb64").model.input_shape == (3, 64, 64)


def test_overrides_are_typed_and_nested():
    cfg = load_config("mnist", ["train.lr=3e-4", "model.hidden_channels=[16, 32]", "train.amp=false"])
    assert cfg.train.lr == 3e-4 and cfg.model.hidden_channels == [16, 32] and cfg.train.amp is False


def _one_line_error(preset, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset, overrides)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value) and "pydantic" not in str(info.value)
    return str(info.value)


def test_unknown_key_names_it_lists_the_section_and_suggests_the_closest():
    keys = ", ".join(sorted(TrainConfig.model_fields))
    assert _one_line_error("mnist", ["train.lrr=1"]) == f"train.lrr: no such key; did you mean lr? train keys: {keys}"
    assert _one_line_error("mnist", ["train.nosuch=1"]) == f"train.nosuch: no such key; train keys: {keys}"
    assert _one_line_error("mnist", ["modle.latent_dim=4"]) == (
        "modle: no such key; did you mean model? config keys: model, name, objective, train")


def test_bad_value_names_key_value_and_problem():
    assert _one_line_error("mnist", ["train.lr=abc"]) == (
        "train.lr='abc': Input should be a valid number, unable to parse string as a number")
    assert _one_line_error("mnist", ["model.likelihood=poisson"]).startswith(
        "model.likelihood='poisson': Input should be 'bernoulli', 'gaussian' or 'logistic'")
    assert _one_line_error("mnist", ["model.image_size=[30, 30]"]).startswith(
        "model: image_size 30x30 is not divisible by 4")
    with pytest.raises(ValueError, match="key=value"):
        load_config("mnist", ["train.lr"])


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="mnist"):
        load_config("nope")


def test_unsupported_size_fails_with_a_suggestion():
    with pytest.raises(ValidationError, match=r"30x30 is not divisible by 4"):
        ModelConfig(image_size=(30, 30))
    with pytest.raises(ValueError, match="not divisible by 16"):
        load_config("rgb64").with_image_shape(28, 28, 3)


def test_digest_tracks_content():
    a, b = load_config("mnist"), load_config("mnist", ["train.lr=0.004"])
    assert a.digest() == load_config("mnist").digest() and a.digest() != b.digest()
    assert VAEConfig().flat()["model.latent_dim"] == 32


def _can_build_without_isolation() -> bool:
    """True when this environment's setuptools (>=68, with wheel support) can build the wheel offline."""
    from importlib.metadata import PackageNotFoundError, version

    def _v(name: str) -> tuple[int, ...]:
        try:
            return tuple(int(p) for p in version(name).split(".")[:2] if p.isdigit())
        except PackageNotFoundError:
            return ()

    setuptools = _v("setuptools")
    # setuptools >= 70.1 builds wheels by itself; before that it needs the `wheel` package.
    return setuptools >= (68,) and (setuptools >= (70, 1) or bool(_v("wheel")))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_presets_ship_in_the_wheel(tmp_path):
    """A wheel of the project (what `pip install .` or a container gets) carries every preset and loads it."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    presets = repo / "vae_core" / "presets"
    shipped = sorted(p.relative_to(presets).with_suffix("").as_posix() for p in presets.rglob("*.yaml"))
    assert shipped, "no presets in vae_core/presets"

    # Build from a clean copy: an in-tree build would leave build/ in the checkout, and a stale
    # build/lib there could put presets into the wheel that the package data no longer declares.
    top_level_junk = {".git", ".venv", "build", "dist", ".pytest_cache", ".vae", "mlruns", ".whl"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        junk = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        return junk | (top_level_junk & set(names) if Path(folder) == repo else set())

    src = tmp_path / "src"
    shutil.copytree(repo, src, symlinks=True, ignore=ignore)
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
    if _can_build_without_isolation():
        cmd.insert(-1, "--no-build-isolation")
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("vae_platform-*.whl")

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        assert sorted(n for n in zf.namelist() if n.startswith("vae_core/presets/")) == sorted(
            f"vae_core/presets/{name}.yaml" for name in shipped)
        zf.extractall(site)

    probe = (
        "import json, vae_core\n"
        "from vae_core.model.config import list_objectives, list_presets, load_config\n"
        "names, objectives = list_presets(), list_objectives()\n"
        "print(json.dumps({'file': vae_core.__file__, 'presets': names, 'objectives': objectives,"
        " 'loaded': [load_config(n).name for n in names] + [load_config('mnist', objective=o).name for o in objectives]}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    ran = subprocess.run([sys.executable, "-c", probe], cwd=site, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    import json

    result = json.loads(ran.stdout.strip().splitlines()[-1])
    module = Path(result["file"]).resolve()
    assert module.is_relative_to(site.resolve()) and not module.is_relative_to(repo), module
    objectives = [n.removeprefix("objectives/") for n in shipped if n.startswith("objectives/")]
    assert result["presets"] == [n for n in shipped if "/" not in n] and result["objectives"] == objectives
    assert result["loaded"] == result["presets"] + [f"mnist+{o}" for o in objectives]
