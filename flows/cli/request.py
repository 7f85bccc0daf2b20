"""A `vae` command's options, made from its stage's request model, so each option is declared once.

Each field of the request becomes `--field-name` (or the names in `json_schema_extra={"cli": [...]}`;
"argument" makes it positional, None leaves it out of the command line), with the field's description
as help and its default as default. The command validates the request before it does anything else,
then runs inside `flows.cli.outcome.outcome` (one `error:` line, `--debug`, Ctrl-C).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ValidationError

from flows.cli.outcome import DEBUG, fail, outcome


def _cli_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """The type typer parses a field as, plus Option keywords; pydantic does the rest of the parsing."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _cli_type(args[0])
    origin = typing.get_origin(annotation)
    if origin is Literal:  # the choices show in --help; pydantic names a bad one like any bad value
        return type(args[0]), {"metavar": "|".join(map(str, args))}
    if origin in (dict, list):  # key=value pairs and repeatable values
        return list[str], {}
    if annotation in (bool, int, float, str):
        return annotation, {}
    return str, {}  # tuples ("28,28") and the like: the request's validators parse the text


def _parameter(name: str, field: Any) -> inspect.Parameter | None:
    extra = field.json_schema_extra or {}
    names = extra.get("cli", ...)
    if names is None:
        return None
    kind, kw = _cli_type(field.annotation)
    help_text = field.description or ""
    if names == "argument":
        info = typer.Argument(help=help_text, show_default=False)
    else:
        decls = names if names is not ... else ["--" + name.replace("_", "-")]
        if kind is bool:
            decls = [f"{d}/--no-{d[2:]}" for d in decls]
        info = typer.Option(*decls, help=help_text, **kw)
    default = ... if field.is_required() else field.get_default(call_default_factory=True)
    if isinstance(default, dict):
        default = [f"{k}={v}" for k, v in default.items()]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, info])


def request_command(app: typer.Typer, model: type[BaseModel], extra: dict[str, tuple[Any, Any]] | None = None):
    """Register the decorated `body(request, **extra, debug=...)` as a command whose options are `model`'s
    fields plus `extra` ({name: (Annotated type, default)}: command-line only switches such as --json) and
    --debug; it runs inside `outcome`."""
    extra = {**(extra or {}), "debug": DEBUG}

    def register(body: Callable[..., None]) -> Callable[..., None]:
        params = [p for name, f in model.model_fields.items() if (p := _parameter(name, f)) is not None]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t)
                   for n, (t, d) in extra.items()]

        def command(**kwargs: Any) -> None:
            switches = {k: kwargs.pop(k) for k in extra}
            try:
                request = model.model_validate({k: v for k, v in kwargs.items() if v is not None})
            except (ValidationError, ValueError) as e:
                raise fail(e) from None
            with outcome(switches["debug"]):
                body(request, **switches)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__doc__ = body.__doc__
        app.command(name=body.__name__)(command)
        return body

    return register
