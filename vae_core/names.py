"""The naming rules: dataset, version, model and alias names, dataset references and model URIs.

One rule for every name (letters, digits, '.', '_', '-', starting with a letter or digit), so no name can
leave the folder it names a part of ('../x', 'a/b'). The shard format, the registry and the requests all
check names here; this module imports nothing of vae_core.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator

# \Z, not $: `$` also matches before a final newline ("dig\n"). Use with fullmatch.
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
NAME_HELP = "letters, digits, '.', '_', '-', starting with a letter or digit"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))\Z")
MAX_MODEL_VERSION = 2**31 - 1  # MLflow's SQL stores keep versions in an INTEGER column (32-bit in PostgreSQL)


def check_name(value: str, what: str) -> str:
    """`value` if it follows the naming rule of datasets, versions and models, else ValueError."""
    if not NAME_RULE.fullmatch(value):
        raise ValueError(f"{what} {value!r} must use only {NAME_HELP}")
    return value


def parse_dataset_ref(ref: str) -> tuple[str, str | None]:
    """'mnist' -> ('mnist', None); 'mnist@3f2a' -> ('mnist', '3f2a'); a name or version that could
    leave the data root ('../x', 'a/b') is a ValueError."""
    name, at, version = ref.partition("@")
    check_name(name, "dataset name")
    if at:
        check_name(version, "dataset version")
    return name, version or None


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """'models:/vae-mnist@champion' -> ('vae-mnist', 'champion', None); 'models:/vae-mnist/3' ->
    ('vae-mnist', None, 3). Anything else is a ValueError showing both forms."""
    m = MODEL_URI.fullmatch(uri)
    if not m:
        raise ValueError(f"model {uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION "
                         "(e.g. models:/vae-mnist@challenger, models:/vae-mnist/3)")
    check_name(m["name"], "model name")
    if m["alias"]:
        return m["name"], check_name(m["alias"], "alias"), None
    if not m["version"].isdigit() or int(m["version"]) < 1:
        raise ValueError(f"model version {m['version']!r} in {uri!r} is not a positive whole number")
    if int(m["version"]) > MAX_MODEL_VERSION:  # the store would fail on it with an internal error, not "not found"
        raise ValueError(f"model version {m['version']} in {uri!r} is beyond any registry's versions (at most "
                         f"{MAX_MODEL_VERSION}): name one the model has, or an alias (models:/{m['name']}@champion)")
    return m["name"], None, int(m["version"])


def _checked(parse: Callable[[str], Any]) -> AfterValidator:
    """A pydantic AfterValidator that runs `parse` (which raises ValueError naming the problem) and keeps
    the text as given: surrounding whitespace is an error like any other character outside the rule."""
    def check(value: str) -> str:
        parse(value)
        return value

    return AfterValidator(check)


# Field types that carry their rule: a model derived from a request's fields keeps it.
DatasetName = Annotated[str, _checked(lambda v: check_name(v, "dataset name"))]
ModelName = Annotated[str, _checked(lambda v: check_name(v, "model name"))]
DatasetRef = Annotated[str, _checked(parse_dataset_ref)]  # NAME or NAME@VERSION
ModelURI = Annotated[str, _checked(parse_model_uri)]  # models:/NAME@ALIAS or models:/NAME/VERSION
