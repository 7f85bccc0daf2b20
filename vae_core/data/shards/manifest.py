"""The manifest of a dataset version (``manifest.json``): its pydantic models, their validation, and the
one loader of every manifest the formats write (datasets' here, embeddings' in `vae_core.data.embeddings`)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import fsspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from vae_core.data.shards.format import FORMAT, MANIFEST, SHARD_PATH, SPLITS, check_sha256
from vae_core.names import check_name
from vae_core.storage import to_url

M = TypeVar("M", bound=BaseModel)
LIST_BOUND = 1000  # quarantine or duplicate entries kept inline in manifest.json; longer lists go to Parquet
# What every error about a damaged dataset version ends with.
DAMAGED = "the dataset version is damaged; remove {url} and ingest its source again"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Strict):
    """One Parquet file: its path relative to the version folder, rows, size and SHA-256 of its bytes."""

    path: str
    rows: int = Field(ge=1)
    bytes: int = Field(ge=1)
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside_its_split(cls, v: str) -> str:
        if not SHARD_PATH.fullmatch(v):
            raise ValueError(f"shard path {v!r} is not SPLIT/FILE.parquet (a plain file name in the train, val or "
                             "test folder of the version)")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        return check_sha256(v, "shard sha256")

    @property
    def split(self) -> str:
        """The split folder the shard lies in."""
        return self.path.split("/", 1)[0]


class SplitInfo(_Strict):
    rows: int = Field(ge=0)
    shards: list[ShardInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rows_add_up(self) -> "SplitInfo":
        if sum(s.rows for s in self.shards) != self.rows:
            raise ValueError(f"split has {self.rows} rows but its shards hold {sum(s.rows for s in self.shards)}")
        return self


class QuarantineEntry(_Strict):
    """An input item that is not in the dataset, and why."""

    id: str
    source: str
    reason: str


class DuplicateEntry(_Strict):
    """An input item dropped because its pixels equal those of `duplicate_of`, which was kept.

    `label` and `kept_label` are recorded only where the two disagree (label noise; None there means "no
    label"); where they agree both keys are left out, so that such entries read as before.
    """

    id: str
    source: str
    duplicate_of: str
    label: int | None = None
    kept_label: int | None = None

    @property
    def label_conflict(self) -> bool:
        return self.label != self.kept_label

    @model_serializer(mode="wrap")
    def _conflict_only(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        data = handler(self)
        if not self.label_conflict:
            data.pop("label", None)
            data.pop("kept_label", None)
        return data


class ItemCounts(_Strict):
    """Every item the source yielded is exactly one of ok, duplicate or quarantined."""

    seen: int = Field(ge=0)
    ok: int = Field(ge=0)
    duplicates: int = Field(ge=0)
    quarantined: int = Field(ge=0)

    @model_validator(mode="after")
    def _nothing_lost(self) -> "ItemCounts":
        if self.ok + self.duplicates + self.quarantined != self.seen:
            raise ValueError(
                f"items do not add up: ok {self.ok} + duplicates {self.duplicates} + "
                f"quarantined {self.quarantined} != seen {self.seen}"
            )
        return self


class SourceDescription(_Strict):
    kind: str
    url: str
    details: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Strict):
    """Contents of ``manifest.json``: everything a reader needs without opening a shard.

    channel_mean / channel_std are per channel (length C) of pixel/255 over the train split.
    """

    format: Literal["vae-shards/1"] = FORMAT
    name: str
    version: str
    created_at: str
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: Literal[1, 3]
    splits: dict[str, SplitInfo]
    label_names: list[str] | None = None
    channel_mean: list[float]
    channel_std: list[float]
    items: ItemCounts
    quarantine: list[QuarantineEntry] = Field(default_factory=list)
    duplicates: list[DuplicateEntry] = Field(default_factory=list)
    # Lists longer than LIST_BOUND live in Parquet files beside the manifest (named here) instead.
    quarantine_file: str | None = Field(None, pattern=r"^quarantine\.parquet$")
    duplicates_file: str | None = Field(None, pattern=r"^duplicates\.parquet$")
    conflicts: int | None = Field(None, ge=0, description="duplicates whose label differs from the kept copy's")
    source: SourceDescription
    options: dict[str, Any] = Field(default_factory=dict, description="the ingest options that shaped the rows")

    @field_validator("name", "version")
    @classmethod
    def _named_by_the_rule(cls, v: str) -> str:
        return check_name(v, "name or version")  # both become folder names of every stage's outputs

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if unknown := set(self.splits) - set(SPLITS):
            raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
        for split, info in self.splits.items():
            if strays := [sh.path for sh in info.shards if sh.split != split]:
                raise ValueError(f"split {split!r} lists shards outside its folder: {strays}")
        paths = [sh.path for info in self.splits.values() for sh in info.shards]
        if len(set(paths)) != len(paths):
            raise ValueError(f"shard paths repeat: {sorted({p for p in paths if paths.count(p) > 1})}")
        if len(self.channel_mean) != self.channels or len(self.channel_std) != self.channels:
            raise ValueError(f"channel stats must have {self.channels} entries")
        if sum(s.rows for s in self.splits.values()) != self.items.ok:
            raise ValueError(f"splits hold {sum(s.rows for s in self.splits.values())} rows, items.ok is {self.items.ok}")
        for inline, file, count, what in ((self.quarantine, self.quarantine_file, self.items.quarantined, "quarantine"),
                                          (self.duplicates, self.duplicates_file, self.items.duplicates, "duplicates")):
            if file is None and len(inline) != count:
                raise ValueError(f"the {what} list holds {len(inline)} entries but items count {count}")
            if file is not None and inline:
                raise ValueError(f"the {what} list is both inline and in {file}")
        return self

    @property
    def counts(self) -> dict[str, int]:
        """Rows per split, every split present (0 where empty)."""
        return {s: (self.splits[s].rows if s in self.splits else 0) for s in SPLITS}

    @property
    def image_bytes(self) -> int:
        return self.height * self.width * self.channels

    @property
    def label_conflicts(self) -> int:
        """Duplicates whose label differs from the kept copy's (see DuplicateEntry)."""
        return self.conflicts if self.conflicts is not None else sum(d.label_conflict for d in self.duplicates)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"


def load_manifest(fs: fsspec.AbstractFileSystem, folder: str, model: type[M], what: str = "manifest") -> M:
    """``<folder>/manifest.json`` validated as `model`.

    Raises FileNotFoundError when there is none (the manifest is written last: an unfinished folder), and
    ValueError "<file> is not a valid <what> (<problems>)" naming every problem on one line.
    """
    path = posixpath.join(folder, MANIFEST)
    raw = fs.cat_file(path)
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'manifest'}: {x['msg'].removeprefix('Value error, ')}"
                             for x in e.errors())
        raise ValueError(f"{to_url(fs, path)} is not a valid {what} ({problems})") from None


def read_manifest(fs: fsspec.AbstractFileSystem, version_dir: str) -> Manifest:
    """Load and validate ``manifest.json`` of one dataset version folder."""
    try:
        return load_manifest(fs, version_dir, Manifest)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} in {to_url(fs, version_dir)}: not a finished dataset version") from None
    except ValueError as e:
        raise ValueError(f"{e}: {DAMAGED.format(url=to_url(fs, version_dir))}") from None
