"""Typed configs for the model and its training, loaded from YAML presets with `key=value` overrides.

A preset fixes the architecture and the training choices; the image shape normally comes from the
dataset's manifest (`with_image_shape`), so any ingested dataset trains without editing a preset.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from vae_core.errors import ConfigError

# Presets ship inside the package (package data), so a wheel or `pip install .` has them too;
# the top-level `configs/` of a checkout is a symlink to this folder.
CONFIG_DIR: Traversable = resources.files("vae_core") / "presets"


class Strict(BaseModel):
    """Unknown fields are errors and assignments are validated: configs and stage requests alike."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    """Architecture of a `ConvVAE`."""

    kind: Literal["vae", "ae"] = Field("vae", description="vae: Gaussian posterior and KL; ae: the deterministic "
                                       "autoencoder baseline (same networks, a point-mass posterior, no KL)")
    image_size: tuple[int, int] = (28, 28)
    channels: Literal[1, 3] = 1
    hidden_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64], min_length=1)
    latent_dim: int = Field(32, ge=1)
    top_latent_dim: int = Field(0, ge=0, description="a second stochastic layer of this many dims above the "
                                "latent (p(z2) p(z1|z2), top-down inference, as in ladder VAEs); the latent "
                                "vector is then [z1 | z2]; 0 for one layer")
    hidden_dim: int = Field(0, ge=0, description="width of a dense layer before the latent; 0 for none")
    res_blocks: int = Field(0, ge=0, description="residual blocks (two 3x3 convs, identity at start) after each "
                            "encoder stage and before each decoder stage; 0 for a plain conv stack")
    norm: Literal["none", "batch", "group"] = "none"
    activation: Literal["relu", "elu", "silu", "gelu"] = "elu"
    likelihood: Literal["bernoulli", "gaussian", "logistic"] = "bernoulli"
    binarize: bool = Field(True, description="bernoulli: sample binary targets from grey levels (dynamic binarisation)")

    @model_validator(mode="after")
    def _divisible(self) -> "ModelConfig":
        if self.kind == "ae" and self.top_latent_dim:
            raise ValueError("model.kind=ae has one deterministic code and no stochastic layers; "
                             "set model.top_latent_dim=0")
        factor = 2 ** len(self.hidden_channels)
        h, w = self.image_size
        if h % factor or w % factor:
            raise ValueError(
                f"image_size {h}x{w} is not divisible by {factor} "
                f"({len(self.hidden_channels)} stride-2 stages); use a size such as "
                f"{factor * max(1, h // factor)}x{factor * max(1, w // factor)} or fewer hidden_channels"
            )
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model takes."""
        return (self.channels, *self.image_size)


#: The KL warm-up's length, in one of three units: an override of one replaces whichever the preset set.
KL_WARMUP = ("kl_warmup_steps", "kl_warmup_epochs", "kl_warmup_fraction")


class TrainConfig(Strict):
    """Optimisation, objective and schedule."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_floor: float = Field(0.1, ge=0, le=1, description="cosine: the rate it ends at, as a fraction of lr")
    time_budget_minutes: float | None = Field(
        None, gt=0, description="minutes of training (validation included) the run fits in: it ends after the last "
        "epoch that, at the mean epoch time so far, does not overrun them, and a cosine schedule runs down over "
        "those epochs; `epochs` is then an upper bound")
    grad_clip: float = Field(0.0, ge=0, description="max gradient norm; 0 disables clipping")
    beta: float = Field(1.0, ge=0)
    kl_schedule: Literal["constant", "linear", "cyclical"] = "linear"
    kl_warmup_steps: int = Field(0, ge=0, description="linear: optimizer steps to ramp beta from 0 (a count that "
                                 "means more epochs on less data: prefer kl_warmup_epochs or kl_warmup_fraction)")
    kl_warmup_epochs: float = Field(0.0, ge=0, description="linear: epochs to ramp beta from 0, whatever the "
                                    "data's size")
    kl_warmup_fraction: float = Field(0.0, ge=0, le=1, description="linear: share of the planned steps (epochs x "
                                      "steps per epoch; under a time budget, the epochs it plans) to ramp beta "
                                      "from 0")
    kl_cycle_steps: int = Field(1000, ge=1, description="cyclical: length of one cycle")
    kl_cycle_ratio: float = Field(0.5, gt=0, le=1, description="cyclical: fraction of a cycle spent ramping")
    free_bits: float = Field(0.0, ge=0, description="nats per latent dim below which KL is not penalised")
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    num_threads: int = Field(0, ge=0, description="torch intra-op threads on CPU; 0 keeps torch's default")
    device_data_mb: float = Field(4096, ge=0, description="on a GPU, a split held in memory whose pixels fit this "
                                  "many MiB lives on the GPU as uint8 (batches are gathered there); else in "
                                  "pinned host memory")
    log_every: int = Field(50, ge=1)
    image_every: int = Field(5, ge=1, description="epochs between sample/reconstruction grids")
    eval_iw_samples: int = Field(0, ge=0, description="IWAE samples for validation NLL; 0 skips it")

    @model_validator(mode="after")
    def _one_warmup(self) -> "TrainConfig":
        named = [k for k in KL_WARMUP if getattr(self, k)]
        if len(named) > 1:
            raise ValueError(f"{' and '.join(named)} are both set: each is the KL warm-up's length, set one")
        return self

    def kl_warmup(self, steps_per_epoch: int, epochs: int) -> int:
        """The linear warm-up's length in optimizer steps, for epochs of `steps_per_epoch` steps and a run
        planned to end after `epochs` (0: no warm-up)."""
        if self.kl_warmup_epochs:
            return max(1, round(self.kl_warmup_epochs * steps_per_epoch))
        if self.kl_warmup_fraction:
            return max(1, round(self.kl_warmup_fraction * steps_per_epoch * epochs))
        return self.kl_warmup_steps

    def for_run(self, steps_per_epoch: int, epochs: int) -> "TrainConfig":
        """This config with the warm-up counted in steps (`kl_warmup`), what `beta_at` reads."""
        return self.model_copy(update={"kl_warmup_steps": self.kl_warmup(steps_per_epoch, epochs),
                                       "kl_warmup_epochs": 0.0, "kl_warmup_fraction": 0.0})


class PerceptualConfig(Strict):
    """A feature-matching loss on chosen layers of a fixed network (DFC-VAE, Hou et al. 2016). Weights
    are never downloaded: the dataset version's feature classifier (the one evaluate-vae trains), or a
    torchvision VGG-16 read from a local file."""

    weight: float = Field(0.0, ge=0, description="weight of the term; 0 turns it off")
    network: Literal["classifier", "vgg16"] = "classifier"
    weights: str | None = Field(None, description="classifier: a feature_net.safetensors file (default: the "
                                "dataset version's cached classifier, trained if missing); vgg16: the file of "
                                "torchvision's vgg16 state dict (required)")
    layers: list[str] = Field(default_factory=list, description="module names whose outputs are matched; empty: "
                              "the network's defaults (see vae_core.training.perceptual)")


class AdversarialConfig(Strict):
    """A PatchGAN discriminator trained beside the VAE with its own optimizer: its verdict on the
    reconstructions (and prior samples) as a loss, and its features as a learned similarity (VAE-GAN,
    Larsen et al. 2016)."""

    weight: float = Field(0.0, ge=0, description="weight of the generator's adversarial term (times the adaptive "
                          "weight when adaptive_weight); 0 with feature_weight 0 turns the discriminator off")
    feature_weight: float = Field(0.0, ge=0, description="VAE-GAN learned similarity: squared distance between "
                                  "the discriminator's features of an image and of its reconstruction")
    loss: Literal["hinge", "non_saturating"] = "hinge"
    start_step: int = Field(0, ge=0, description="optimizer step at which the discriminator and its terms start")
    adaptive_weight: bool = Field(True, description="scale the adversarial term by |grad rec| / |grad adv| at the "
                                  "decoder's last layer (Esser et al. 2021, Rombach et al. 2022)")
    max_adaptive_weight: float = Field(1e4, gt=0)
    prior_fakes: bool = Field(True, description="also show the discriminator decodes of prior samples")
    channels: list[PositiveInt] = Field(default_factory=lambda: [64, 128], min_length=1,
                                        description="discriminator widths, one stride-2 stage each")
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.9)

    @property
    def enabled(self) -> bool:
        return self.weight > 0 or self.feature_weight > 0


class ObjectiveConfig(Strict):
    """What the loss is made of, beyond β and the KL schedule (in `train`)."""

    recon_weight: float = Field(1.0, ge=0, description="weight of -log p(x|z); 0 is the KL-only ablation")
    perceptual: PerceptualConfig = Field(default_factory=PerceptualConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)


class VAEConfig(Strict):
    """A whole preset: model, training and objective."""

    name: str = "custom"
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)

    @model_validator(mode="after")
    def _objective(self) -> "VAEConfig":
        obj, beta = self.objective, self.train.beta
        if self.model.kind == "ae" and beta > 0:
            raise ValueError("model.kind=ae has no KL term: set train.beta=0 (or use objective preset ae)")
        if self.model.kind == "ae" and obj.recon_weight == 0:
            raise ValueError("model.kind=ae with objective.recon_weight=0 has nothing to learn")
        if obj.recon_weight == 0 and beta == 0 and obj.perceptual.weight == 0 and not obj.adversarial.enabled:
            raise ValueError("objective.recon_weight=0 and train.beta=0 with no perceptual or adversarial term: "
                             "nothing to minimise")
        return self

    def with_image_shape(self, height: int, width: int, channels: int) -> "VAEConfig":
        """Same preset for another image shape; raises ValueError if the architecture cannot take it."""
        data = self.model_dump()
        data["model"].update(image_size=(height, width), channels=channels)
        return VAEConfig.model_validate(data)

    def digest(self) -> str:
        """Short content hash of the resolved config, for tags and cache keys."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def flat(self) -> dict[str, Any]:
        """Dotted `section.key -> value` view, for logging as parameters."""
        out: dict[str, Any] = {"name": self.name}

        def walk(prefix: str, node: dict[str, Any]) -> None:
            for k, v in node.items():
                walk(f"{prefix}{k}.", v) if isinstance(v, dict) else out.__setitem__(f"{prefix}{k}", v)

        walk("", self.model_dump(mode="json", exclude={"name"}))
        return out


def list_presets() -> list[str]:
    """Names of the presets shipped in `vae_core/presets/`."""
    return sorted(p.name[: -len(".yaml")] for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml") and p.is_file())


def parse_overrides(items: list[str] | dict[str, Any]) -> dict[str, Any]:
    """`["train.lr=3e-4", "model.hidden_channels=[32,64]"]` -> {"train.lr": 0.0003, ...}; values are
    YAML, so numbers, booleans and lists arrive typed. A dict passes through."""
    if isinstance(items, dict):
        return items
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (or {"section.key": value}) to a raw config dict, in place."""
    for key, value in parse_overrides(overrides).items():
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key}={value!r}: {p!r} is not a section")
        node[parts[-1]] = value
        if parts[-1] in KL_WARMUP:  # one warm-up length: the one named last
            for other in set(KL_WARMUP) - {parts[-1]}:
                node.pop(other, None)
    return data


def list_objectives() -> list[str]:
    """Names of the objective presets shipped in `vae_core/presets/objectives/`."""
    folder = CONFIG_DIR / "objectives"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` laid over `base`, section by section (in place on `base`)."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(preset: str | Path = "mnist", overrides: list[str] | dict[str, Any] | None = None,
                objective: str | None = None) -> VAEConfig:
    """Load a preset by name (shipped in `vae_core/presets/`) or by path, lay an objective preset over it
    (`vae_core/presets/objectives/<objective>.yaml`: ae, recon-only, kl-only, elbo, vae-gan, perceptual),
    then apply `key=value` overrides.

    Raises:
        FileNotFoundError: unknown preset or objective, listing the shipped ones.
        ConfigError: a bad key or value, in one line that names it (see `config_error`).
    """
    path: Path | Traversable = Path(preset)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config preset {str(preset)!r}; shipped presets: {', '.join(list_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", Path(path.name).stem)
    if objective:
        layer = CONFIG_DIR / "objectives" / f"{objective}.yaml"
        if "/" in objective or not layer.is_file():
            raise FileNotFoundError(f"no objective preset {objective!r}; shipped objectives: "
                                    f"{', '.join(list_objectives())}")
        _merge(data, yaml.safe_load(layer.read_text()) or {})
        data["name"] = f"{data['name']}+{objective}"
    try:
        return VAEConfig.model_validate(apply_overrides(data, overrides or {}))
    except ValidationError as e:
        raise config_error(e) from None


def config_error(e: ValidationError) -> ConfigError:
    """pydantic's report (many lines, a URL per error) as one line a user can act on, e.g.
    `train.lrr: no such key; did you mean lr? train keys: amp, batch_size, ...` or
    `train.lr='abc': Input should be a valid number, ...`."""
    parts = []
    for err in e.errors():
        where = ".".join(map(str, err["loc"]))
        if err["type"] == "extra_forbidden":
            keys = _keys_beside(err["loc"])
            close = difflib.get_close_matches(str(err["loc"][-1]), keys, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            section = ".".join(map(str, err["loc"][:-1])) or "config"
            parts.append(f"{where}: no such key; {hint}{section} keys: {', '.join(keys)}")
        else:
            value = "" if isinstance(err["input"], dict) else f"={err['input']!r}"
            parts.append(f"{where or 'config'}{value}: {err['msg'].removeprefix('Value error, ')}")
    return ConfigError("; ".join(parts))


def _keys_beside(loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys of the section holding `loc`'s last key, sorted (VAEConfig's own at the top)."""
    model: Any = VAEConfig
    for key in loc[:-1]:  # pydantic reports an extra key only inside a model, so each step is a model field
        model = model.model_fields[str(key)].annotation
    return sorted(model.model_fields)
