import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from flows.cli.app import app

runner = CliRunner()


def test_help_lists_every_stage_with_help_text():
    out = subprocess.run([sys.executable, "-m", "flows.cli.app", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in ("ingest", "train", "evaluate", "encode", "demo", "stack"):
        line = next((ln for ln in out.stdout.splitlines() if f" {stage} " in ln), "")
        assert len(line.split(stage, 1)[1].strip(" │")) > 10, f"{stage} has no help text"


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_says_where_to_look(tmp_path, prefect_server):
    """`vae demo`, in its own process as a user runs it: ingest the built-in digits, train, evaluate and promote,
    encode, in one command."""
    from prefect.settings import PREFECT_API_URL

    from vae_core.data.embeddings import read_embeddings

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VAE_DEBUG")}
    env.update(VAE_HOME=str(tmp_path), PREFECT_API_URL=PREFECT_API_URL.value())  # the session's server: no start-up
    # One epoch: the first model is promoted whatever its score (no champion yet), and every stage still runs.
    proc = subprocess.run([sys.executable, "-m", "flows.cli.app", "demo", "--epochs", "1", "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["trained"] == 1 and out["promoted"] and out["champion"] == {"before": None, "after": 1}
    assert out["dataset"]["changed"] and sum(out["dataset"]["counts"].values()) == 1797  # sklearn's digits
    assert out["encoded"] == 1797 and read_embeddings(out["where"]["embeddings"]).num_rows == 1797
    assert "<img" in (tmp_path / "reports" / "vae-digits" / "1" / "report.html").read_text()
    assert out["where"]["report"].endswith("report.html") and out["where"]["champion"] == "models:/vae-digits@champion"
    assert out["where"]["mlflow"] == f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    # MLflow's INFO lines (a new store's set-up, its system metrics' notices) are not among the stages' lines.
    assert " INFO mlflow." not in proc.stderr, proc.stderr[-3000:]


def test_stack_lists_its_commands():
    result = runner.invoke(app, ["stack", "--help"])
    assert result.exit_code == 0
    assert all(f" {command} " in result.output for command in ("up", "status", "down"))


def test_every_request_field_is_an_option_of_its_command_with_its_help_and_default():
    """Options are declared once, in the stage's request: the command is made from it."""
    import typer

    from vae_core.requests import EncodeRequest, EvaluateRequest, IngestRequest, TrainRequest

    commands = typer.main.get_command(app).commands
    for name, model in (("ingest", IngestRequest), ("train", TrainRequest), ("evaluate", EvaluateRequest),
                        ("encode", EncodeRequest)):
        params = {p.name: p for p in commands[name].params}
        for field_name, field in model.model_fields.items():
            if (field.json_schema_extra or {}).get("cli", ...) is None:
                assert field_name not in params  # Python-only options (fsspec storage options, ...)
                continue
            param = params[field_name]
            assert field.description and field.description in (param.help or ""), field_name
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            if default not in (None, {}):
                assert param.default == default, field_name
        assert set(params) - set(model.model_fields) <= {"prefect", "as_json", "debug"}
    assert "--config" in {o for p in commands["train"].params for o in p.opts}  # the preset's older name


def test_a_bad_request_is_one_line_before_anything_starts():
    cases = [
        (["train", "--dataset", "../../outside/stolen"], "dataset name '../../outside/stolen' must use only"),
        (["train", "--dataset", "mnist@../../../outside/x"], "dataset version '../../../outside/x' must use only"),
        (["train", "--dataset", "mnist", "--set", "train.lr"], "override 'train.lr' is not of the form key=value"),
        (["train", "--dataset", "mnist", "--workers", "0"], "workers: Input should be greater than or equal to 1"),
        (["train", "--dataset", "mnist", "--model-name", "a/b"], "model name 'a/b' must use only"),
        (["ingest", "x", "--name", "y", "--fit", "stretch"], "fit: Input should be 'crop' or 'pad'"),
        (["train", "--dataset", "mnist", "--set", "train.nosuch=1"],
         "train.nosuch: no such key; train keys: amp, batch_size, beta, channels_last, device_data_mb, epochs"),
        (["train", "--dataset", "mnist", "--objective", "gan"], "no objective preset 'gan'; shipped objectives: ae, "),
        (["train", "--dataset", "mnist", "--set", "train.lr=abc"], "train.lr='abc': Input should be a valid number"),
        (["train", "--dataset", "mnist", "--set", "model.laten_dim=4"], "did you mean latent_dim? model keys: "),
        (["train", "--dataset", "mnist", "--preset", "nope"], "no config preset 'nope'; shipped presets: digits"),
        (["encode", "--model", "models:/x/99999999999999999999", "--dataset", "mnist"],
         "model version 99999999999999999999 in 'models:/x/99999999999999999999' is beyond any registry's versions"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.stderr)


def _vae(args, env, timeout=300):
    """`vae ARGS` in a fresh process, as a user runs it (Prefect's temporary server included)."""
    return subprocess.run([sys.executable, "-m", "flows.cli.app", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _env(tmp_path, **extra):
    """The test's environment without a Prefect server or home: the command picks them as a user's would."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "VAE_DEBUG")}
    return {**env, "VAE_HOME": str(tmp_path / "vae"), **extra}


@pytest.mark.slow
def test_an_error_in_prefect_mode_is_one_line_and_prefect_state_stays_under_vae_home(tmp_path):
    r = _vae(["ingest", str(tmp_path / "missing"), "--name", "x"], _env(tmp_path))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing'}: source not found", r.stderr
    assert "Traceback" not in r.stderr and "database is locked" not in r.stderr, r.stderr
    assert "Flow run" in r.stderr  # Prefect's progress lines stay
    assert (tmp_path / "vae" / "prefect" / "prefect.db").is_file()  # not ~/.prefect


@pytest.mark.slow
def test_debug_shows_the_tracebacks_and_a_set_prefect_home_is_kept(tmp_path):
    env = _env(tmp_path, PREFECT_HOME=str(tmp_path / "ph"))
    r = _vae(["ingest", str(tmp_path / "missing"), "--name", "x", "--debug"], env)
    assert r.returncode == 1, r.stderr
    assert f"error: {tmp_path / 'missing'}: source not found" in r.stderr.splitlines(), r.stderr
    assert "Traceback" in r.stderr
    assert (tmp_path / "ph" / "prefect.db").is_file() and not (tmp_path / "vae" / "prefect").exists()


def _command_paths(command, path=()):
    """Every command and subcommand of a click command, as argument lists."""
    yield list(path)
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_no_help_shows_a_flag_as_if_it_took_a_value():
    """`--json`, `--debug`, `--help`, `--prefect/--no-prefect`: a flag is written without a type, in every
    command's help."""
    import typer

    paths = list(_command_paths(typer.main.get_command(app)))
    assert ["stack", "up"] in paths and ["ingest"] in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, (path, result.output)
        assert "--help " in result.output, path
    help_text = runner.invoke(app, ["stack", "up", "--help"], terminal_width=200).output
    assert re.search(r"^\s+--env\s+Print only", help_text, re.M), help_text
