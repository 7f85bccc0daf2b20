import pytest
from pydantic import ValidationError

from vae_core.config import ModelConfig, VAEConfig, list_presets, load_config


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_loads_and_builds(preset):
    from vae_core import ConvVAE

    cfg = load_config(preset)
    assert cfg.name == preset
    model = ConvVAE(cfg.model)
    assert model.latent_dim == cfg.model.latent_dim


def test_presets_cover_mnist_and_rgb64():
    assert load_config("mnist").model.input_shape == (1, 28, 28)
    assert load_config("rgb64").model.input_shape == (3, 64, 64)


def test_overrides_are_typed_and_nested():
    cfg = load_config("mnist", ["train.lr=3e-4", "model.hidden_channels=[16, 32]", "train.amp=false"])
    assert cfg.train.lr == 3e-4 and cfg.model.hidden_channels == [16, 32] and cfg.train.amp is False


def test_unknown_key_and_bad_value_are_named():
    with pytest.raises(ValidationError, match="lrr"):
        load_config("mnist", ["train.lrr=1"])
    with pytest.raises(ValidationError, match="likelihood"):
        load_config("mnist", ["model.likelihood=poisson"])
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
    a, b = load_config("mnist"), load_config("mnist", ["train.lr=0.003"])
    assert a.digest() == load_config("mnist").digest() and a.digest() != b.digest()
    assert VAEConfig().flat()["model.latent_dim"] == 32
