"""The `vae` command line: each pipeline stage on one machine, with embedded defaults.

A stage's options come from its request (`vae_core.requests`), declared there once. Heavy imports
(torch, prefect, ray, mlflow) happen inside the commands so `vae --help` is instant. How a command ends
(one `error:` line, `--debug`, Ctrl-C) is `flows.cli.outcome`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from pydantic import BaseModel

from flows.cli.outcome import DEBUG, outcome
from flows.cli.prefect import prefect_defaults, quiet_prefect_logs, run_flow
from flows.cli.request import request_command
from vae_core.requests import EncodeRequest, EvaluateRequest, IngestRequest, TrainRequest
from vae_core.results import EncodeResult, EvaluateResult, TrainResult

app = typer.Typer(
    help="Train Variational AutoEncoders on image datasets and turn datasets into latent embeddings.\n\n"
    "Stages: ingest -> train -> evaluate -> encode. State lives under $VAE_HOME (default ./.vae).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help layout: typer's rich panels print a type such as `<bool>` beside every flag, --help
    # included, as if it took a value.
    rich_markup_mode=None,
)


AS_JSON = (Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a summary.")], False)


def echo_json(result: BaseModel) -> None:
    """`--json`: the result as one line of JSON."""
    typer.echo(json.dumps(result.model_dump(mode="json")))


@request_command(app, IngestRequest, extra={"prefect": (Annotated[bool, typer.Option(
    help="Run as the Prefect flow `ingest-dataset` (--no-prefect: in process).")], True), "as_json": AS_JSON})
def ingest(req: IngestRequest, prefect: bool, as_json: bool, debug: bool) -> None:
    """Turn an image source into versioned, validated Parquet shards (a re-run finds the same version)."""
    if prefect:
        prefect_defaults()
        from flows.ingest import ingest_dataset

        quiet_prefect_logs(debug)
        out = ingest_dataset(req, progress=not as_json)
    else:
        from vae_core.ingestion.ingest import run_ingest

        out = run_ingest(req, progress=not as_json).summary()
    if as_json:
        return echo_json(out)
    verb = "created" if out.created else "already there, nothing written:"
    typer.echo(f"{verb} {out.ref} at {out.path}")
    h, w, c = out.shape
    counts = ", ".join(f"{k} {v:,}" for k, v in out.counts.items())
    typer.echo(f"{h}x{w}x{c} images: {counts}; {out.duplicates:,} duplicates, {out.quarantined:,} quarantined "
               f"of {out.seen:,} seen")
    if out.label_conflicts:
        typer.echo(f"{out.label_conflicts:,} duplicates disagree with the kept copy on their label: see the "
                   "duplicates in manifest.json")
    if out.nodes:
        where = ", ".join(f"{n.address} {n.rows:,}" for n in out.nodes)
        typer.echo(f"decoded by this run: {sum(n.rows for n in out.nodes):,} items ({where}); "
                   f"{out.retries:,} storage reads retried")


@request_command(app, TrainRequest, extra={"as_json": AS_JSON})
def train(req: TrainRequest, as_json: bool, debug: bool) -> None:
    """Train a VAE on an ingested dataset with Ray, tracked and registered in MLflow."""
    from vae_core.model.config import load_config

    load_config(req.preset, req.overrides, req.objective)  # a bad preset or override fails here, in a second, not in the flow
    out: TrainResult = run_flow("flows.train:train_vae", debug, req)
    if as_json:
        return echo_json(out)
    m = out.metrics
    typer.echo(f"run {out.run_id}: {out.model_uri} (version {out.model_version})")
    typer.echo(f"final loss {m.get('loss', float('nan')):.3f}, val loss {m.get('val_loss', float('nan')):.3f} "
               "(both at beta = 1: see docs/train.md)")
    for warning in out.warnings:
        typer.echo(f"warning: {warning}", err=True)


@request_command(app, EvaluateRequest, extra={"as_json": AS_JSON})
def evaluate(req: EvaluateRequest, as_json: bool, debug: bool) -> None:
    """Score a registered model, draw what it learned, and promote it to champion when it beats the current one."""
    out: EvaluateResult = run_flow("flows.evaluate:evaluate_vae", debug, req, progress=not as_json)
    if as_json:
        return echo_json(out)
    typer.echo(f"{out.model_uri} on {out.dataset}@{out.dataset_version} {out.split} "
               f"({out.images:,} images, K={out.iw_samples})")
    theirs = out.champion.metrics if out.champion else {}
    for key, value in out.metrics.items():
        if "/kl_dim_" not in key:
            typer.echo(f"  {key:<36} {value:>12.4f}" + ("" if key not in theirs else f"   champion {theirs[key]:.4f}"))
    for note in out.notes:
        typer.echo(f"  note: {note}")
    if (decision := out.decision) is not None:
        typer.echo(f"{'promoted to champion' if decision.promote else 'not promoted'}: {decision.reason}")
    typer.echo(f"report: {out.report_url}")


@request_command(app, EncodeRequest, extra={"as_json": AS_JSON})
def encode(req: EncodeRequest, as_json: bool, debug: bool) -> None:
    """Encode every image of a dataset into Parquet latents (mean, logvar), one file per shard, exactly once."""
    out: EncodeResult = run_flow("flows.encode:encode_dataset", debug, req, progress=not as_json)
    if as_json:
        return echo_json(out)
    rows = ", ".join(f"{split} {n:,}" for split, n in out.rows.items())
    speed = f" at {out.images_per_s:,.0f} images/s" if out.images_per_s else ""
    typer.echo(f"{out.model_uri} on {out.dataset}@{out.dataset_version}: {rows}")
    typer.echo(f"encoded {out.rows_encoded:,}{speed}, reused {out.rows_reused:,}, "
               f"already there {out.rows_already_there:,}")
    typer.echo(f"output: {out.output}")


stack_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)
app.add_typer(stack_app, name="stack", help="Start, check or stop the local stack for deployments on this machine: "
              "Prefect server and worker, MLflow server, Ray head, and PostgreSQL with --db postgres; state under "
              "$VAE_HOME/stack (docs/stack.md).")


@stack_app.command("up")
def stack_up(
    prefect_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Prefect server port (API and UI; "
                                                        "default 4200).")] = None,
    mlflow_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="MLflow tracking server port "
                                                       "(default 5000).")] = None,
    ray_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Ray head port, RAY_ADDRESS "
                                                    "(default 6379).")] = None,
    ray_dashboard_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Ray dashboard port, used only "
                                                              "when Ray's dashboard packages are installed (default "
                                                              "8265).")] = None,
    pool: Annotated[Optional[str], typer.Option(help="Process work pool the worker polls, created if missing "
                                                "(default vae-local).")] = None,
    ray_cpus: Annotated[Optional[int], typer.Option(min=1, help="CPUs the Ray head offers (default: all).")] = None,
    db: Annotated[Optional[Literal["sqlite", "postgres"]], typer.Option(help="Where MLflow and "
                                              "Prefect keep their state: SQLite files under $VAE_HOME, or a private "
                                              "PostgreSQL started with the stack, for several writers at once "
                                              "(default sqlite).")] = None,
    postgres_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="PostgreSQL port, with --db postgres "
                                                         "(default 5432).")] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for every service to be healthy.")] = 180.0,
    env: Annotated[bool, typer.Option("--env", help="Print only the export lines: no progress or summary.")] = False,
    as_json: AS_JSON[0] = False,
    debug: DEBUG[0] = False,
) -> None:
    """Start the stack, or find it running: progress and UI URLs on stderr, `export` lines on stdout, so that
    `eval "$(vae stack up)"` points this shell at it. Options left out are the running stack's, else the defaults."""
    with outcome(debug):
        from flows.stack.control import up

        say = (lambda line: None) if as_json or env else (lambda line: typer.echo(line, err=True))
        stack = up(prefect_port, mlflow_port, ray_port, pool=pool, ray_cpus=ray_cpus,
                   ray_dashboard_port=ray_dashboard_port, db=db, postgres_port=postgres_port, timeout=timeout, say=say)
    if as_json:
        typer.echo(json.dumps(stack.to_json()))
        return
    for line in stack.describe():
        say(line)
    typer.echo(stack.exports())


@stack_app.command("status")
def stack_status(as_json: AS_JSON[0] = False, debug: DEBUG[0] = False) -> None:
    """Check each service of the recorded stack now: exit 0 when all are healthy, 1 otherwise (none recorded too)."""
    with outcome(debug):
        from flows.stack.control import status

        stack = status()
    if as_json:
        typer.echo(json.dumps(stack.to_json()))
    elif not stack.services:
        typer.echo(f"no stack recorded ({stack.state}); `vae stack up` starts one")
    else:
        typer.echo("\n".join(stack.describe()))
    if not stack.healthy:
        raise typer.Exit(code=1)


@stack_app.command("down")
def stack_down(
    timeout: Annotated[float, typer.Option(min=0, help="Seconds between SIGTERM and SIGKILL.")] = 20.0,
    debug: DEBUG[0] = False,
) -> None:
    """Stop what `vae stack up` started (worker first, Postgres last, its data kept), children included, and
    remove the state file."""
    with outcome(debug):
        from flows.stack.control import EXITED, down

        said = down(timeout=timeout)
    if stopped := [entry for entry in said if EXITED not in entry]:
        typer.echo(f"stopped {', '.join(stopped)}")
    for entry in said:
        if EXITED in entry:
            typer.echo(entry)
    if not said:
        typer.echo("nothing was running")


@app.command()
def demo(
    source: Annotated[Optional[Path], typer.Argument(help="An MNIST folder (IDX files) to use instead of the "
                                                     "built-in digits.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs (default 20 for the digits, "
                                                  "2 for MNIST).")] = None,
    as_json: AS_JSON[0] = False,
    debug: DEBUG[0] = False,
) -> None:
    """The whole chain on this machine, offline: ingest, train, evaluate and promote, encode; then where to look."""
    with outcome(debug):
        out = run_flow("flows.cli.demo:run_demo", debug, source, epochs, progress=not as_json)
    if as_json:
        return echo_json(out)
    for stage, note in out.notes.items():
        typer.echo(f"{stage:<9} {note}")
    where = out.where
    typer.echo("\nwhere to look:")
    typer.echo(f"  MLflow       {where['mlflow']}")
    for key in ("report", "embeddings", "champion"):
        if key in where:
            typer.echo(f"  {key:<12} {where[key]}")


def main() -> None:
    """The `vae` command. MLflow's INFO lines (its database set-up, "Skip logging GPU metrics", ...) would sit
    among a stage's progress: they are off unless --debug (or VAE_DEBUG) or MLFLOW_LOGGING_LEVEL says otherwise.
    Its warnings stay. Set before MLflow is imported, which reads it then (and so do Ray's workers); not for
    `vae stack`, whose servers keep their logs as they are."""
    stages = {c.name or c.callback.__name__ for c in app.registered_commands}  # the commands; `stack` is a group
    if sys.argv[1:2] and sys.argv[1] in stages and "--debug" not in sys.argv and not os.environ.get("VAE_DEBUG"):
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    app()


if __name__ == "__main__":
    main()
