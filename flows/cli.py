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


def _short_error(e: Exception) -> str:
    """One line per problem; pydantic's validation errors otherwise span many lines and a URL."""
    errors = getattr(e, "errors", None)
    if callable(errors) and type(e).__name__ == "ValidationError":
        return "; ".join(f"{'.'.join(map(str, x['loc'])) or 'options'}: {x['msg']}" for x in errors())
    return str(e)


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="Image folder (any fsspec URL), MNIST IDX folder, .npz, .parquet "
                                               "file or folder, or builtin:digits.")],
    name: Annotated[str, typer.Option(help="Dataset name.")],
    format: Annotated[str, typer.Option(help="auto, folder, idx, npz, parquet or builtin.")] = "auto",
    data_root: Annotated[Optional[str], typer.Option(help="Datasets root URL (default $VAE_HOME/datasets).")] = None,
    image_size: Annotated[Optional[str], typer.Option(help="H,W to resize to (default: keep the source's).")] = None,
    channels: Annotated[Optional[int], typer.Option(help="1 or 3 (default: keep the source's).")] = None,
    fit: Annotated[str, typer.Option(help="Aspect ratio with --image-size: crop (centre) or pad (black).")] = "crop",
    val_fraction: Annotated[float, typer.Option(help="Share of train carved out as val, by id hash.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Test share for sources without splits, by id hash.")] = 0.1,
    shard_mb: Annotated[float, typer.Option(help="Max uncompressed pixel MiB per shard.")] = 64,
    max_quarantine_fraction: Annotated[float, typer.Option(help="Fail above this share of bad items.")] = 0.05,
    workers: Annotated[int, typer.Option(help="Decode processes (0: one per CPU).")] = 0,
    image_column: Annotated[Optional[str], typer.Option(help="Parquet: column of image bytes.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Parquet: column of labels.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N items (quick runs).")] = None,
    prefect: Annotated[bool, typer.Option(help="Run as the Prefect flow `ingest-dataset` (--no-prefect: in process).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: name, version, path, counts, ...")] = False,
) -> None:
    """Turn an image source into versioned, validated Parquet shards (a re-run finds the same version)."""
    from flows.settings import data_root as default_data_root
    from vae_core.ingest import IngestConfig, IngestError, parse_image_size, run_ingest
    from vae_core.sources.base import SourceError

    try:
        params = dict(
            source=source, name=name, data_root=data_root or default_data_root(), format=format,
            image_size=parse_image_size(image_size) if image_size else None, channels=channels, fit=fit,
            val_fraction=val_fraction, test_fraction=test_fraction, shard_mb=shard_mb,
            max_quarantine_fraction=max_quarantine_fraction, workers=workers, image_column=image_column,
            label_column=label_column, limit=limit,
        )
        cfg = IngestConfig(**params)  # validates every option before Prefect or a decoder starts
        if prefect:
            from flows.ingest import ingest_dataset

            out = ingest_dataset(**params, progress=not as_json)
        else:
            out = run_ingest(cfg, progress=not as_json).summary()
    except (SourceError, IngestError, ValueError, FileNotFoundError) as e:
        typer.secho(f"error: {_short_error(e)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    if as_json:
        typer.echo(json.dumps(out))
        return
    verb = "created" if out["created"] else "already there, nothing written:"
    typer.echo(f"{verb} {out['name']}@{out['version']} at {out['path']}")
    h, w, c = out["shape"]
    counts = ", ".join(f"{k} {v:,}" for k, v in out["counts"].items())
    typer.echo(f"{h}x{w}x{c} images: {counts}; {out['duplicates']:,} duplicates, {out['quarantined']:,} quarantined "
               f"of {out['seen']:,} seen")


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="NAME or NAME@VERSION of an ingested dataset (latest by default).")],
    config: Annotated[str, typer.Option(help="Preset from configs/ (or a YAML path).")] = "mnist",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Config override key=value; repeatable.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs (overrides the preset).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (DDP ranks).")] = 1,
    cpus_per_worker: Annotated[Optional[float], typer.Option(help="CPUs reserved per worker (fractional ok).")] = None,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per worker; > 0 trains on GPUs with NCCL.")] = 0.0,
    model_name: Annotated[Optional[str], typer.Option(help="Registered model name (default vae-<dataset>).")] = None,
    max_failures: Annotated[int, typer.Option(help="Worker-group restarts from the last checkpoint.")] = 2,
    memory_budget_mb: Annotated[float, typer.Option(
        help="MiB of pixels a worker holds per split; a larger split streams through Ray Data.")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: run, model, final metrics.")] = False,
) -> None:
    """Train a VAE on an ingested dataset with Ray, tracked and registered in MLflow."""
    from flows.train import TrainError, train_vae

    try:
        out = train_vae(dataset=dataset, preset=config, overrides=set_ or [], epochs=epochs, workers=workers,
                        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, model_name=model_name,
                        max_failures=max_failures, memory_budget_mb=memory_budget_mb)
    except (TrainError, FileNotFoundError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    if as_json:
        typer.echo(json.dumps(out))
    else:
        m = out["metrics"]
        typer.echo(f"run {out['run_id']}: {out['model_uri']} (version {out['model_version']})")
        typer.echo(f"final loss {m.get('loss', float('nan')):.3f}, val loss {m.get('val_loss', float('nan')):.3f}")


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
