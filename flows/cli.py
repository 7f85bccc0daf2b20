"""The `vae` command line: each pipeline stage on one machine, with embedded defaults.

Heavy imports (torch, prefect, ray, mlflow) happen inside the commands so `vae --help` is instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Train Variational AutoEncoders on image datasets and turn datasets into latent embeddings.\n\n"
    "Stages: ingest -> train -> evaluate -> encode. State lives under $VAE_HOME (default ./.vae).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _not_yet(stage: str) -> None:
    typer.secho(
        f"`vae {stage}` is not available in this version yet: the {stage} stage has not been built. "
        "Run `vae --help` for the stages that work.",
        fg=typer.colors.YELLOW,
        err=True,
    )
    raise typer.Exit(code=2)


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="Image folder, MNIST IDX folder, .npz, .parquet or builtin:digits.")],
    name: Annotated[str, typer.Option(help="Dataset name.")] = "",
) -> None:
    """Turn an image source into versioned, validated Parquet shards."""
    _not_yet("ingest")


@app.command()
def train() -> None:
    """Train a VAE on an ingested dataset with Ray, tracked and registered in MLflow."""
    _not_yet("train")


@app.command()
def evaluate() -> None:
    """Score a trained model and promote it to champion when it beats the current one."""
    _not_yet("evaluate")


@app.command()
def encode() -> None:
    """Encode a whole dataset into a Parquet table of latent means and log-variances."""
    _not_yet("encode")


@app.command()
def stack() -> None:
    """Start the local stack (MLflow server, Prefect server and worker) for deployments."""
    _not_yet("stack")


@app.command()
def demo(
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default $VAE_HOME/demo).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the results.")] = False,
) -> None:
    """Run what exists end to end on scikit-learn's digits (offline): train, score, draw pictures."""
    from flows.demo import run_demo

    result = run_demo(out, epochs=epochs, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"test NLL {result['test_nll']:.2f} nats ({result['test_bits_per_dim']:.3f} bits/dim)")
        for k in ("samples", "reconstructions", "interpolation", "weights"):
            typer.echo(f"{k:>16}: {result[k]}")


if __name__ == "__main__":
    app()
