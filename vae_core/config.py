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

    image_size: tuple[int, int] = (28, 28)
    channels: Literal[1, 3] = 1
    hidden_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64], min_length=1)
    latent_dim: int = Field(32, ge=1)
    hidden_dim: int = Field(0, ge=0, description="width of a dense layer before the latent; 0 for none")
    norm: Literal["none", "batch", "group"] = "none"
    activation: Literal["relu", "elu", "silu", "gelu"] = "elu"
    likelihood: Literal["bernoulli", "gaussian", "logistic"] = "bernoulli"
    binarize: bool = Field(True, description="bernoulli: sample binary targets from grey levels (dynamic binarisation)")

    @model_validator(mode="after")
    def _divisible(self) -> "ModelConfig":
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


class TrainConfig(Strict):
    """Optimisation, objective and schedule."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float = Field(0.0, ge=0, description="max gradient norm; 0 disables clipping")
    beta: float = Field(1.0, ge=0)
    kl_schedule: Literal["constant", "linear", "cyclical"] = "linear"
    kl_warmup_steps: int = Field(0, ge=0, description="linear: steps to ramp beta from 0")
    kl_cycle_steps: int = Field(1000, ge=1, description="cyclical: length of one cycle")
    kl_cycle_ratio: float = Field(0.5, gt=0, le=1, description="cyclical: fraction of a cycle spent ramping")
    free_bits: float = Field(0.0, ge=0, description="nats per latent dim below which KL is not penalised")
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    num_threads: int = Field(0, ge=0, description="torch intra-op threads on CPU; 0 keeps torch's default")
    log_every: int = Field(50, ge=1)
    image_every: int = Field(5, ge=1, description="epochs between sample/reconstruction grids")
    eval_iw_samples: int = Field(0, ge=0, description="IWAE samples for validation NLL; 0 skips it")


class VAEConfig(Strict):
    """A whole preset: model plus training."""

    name: str = "custom"
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

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
        for section in ("model", "train"):
            for k, v in getattr(self, section).model_dump(mode="json").items():
                out[f"{section}.{k}"] = v
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
    return data


def load_config(preset: str | Path = "mnist", overrides: list[str] | dict[str, Any] | None = None) -> VAEConfig:
    """Load a preset by name (shipped in `vae_core/presets/`) or by path, then apply `key=value` overrides.

    Raises:
        FileNotFoundError: unknown preset, listing the shipped ones.
        ConfigError: a bad key or value, in one line that names it (see `config_error`).
    """
    path: Path | Traversable = Path(preset)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config preset {str(preset)!r}; shipped presets: {', '.join(list_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", Path(path.name).stem)
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
