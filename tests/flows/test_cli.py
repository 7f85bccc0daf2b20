import json
import subprocess
import sys

from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_help_lists_every_stage_with_help_text():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in ("ingest", "train", "evaluate", "encode", "demo", "stack"):
        line = next((ln for ln in out.stdout.splitlines() if f" {stage} " in ln), "")
        assert len(line.split(stage, 1)[1].strip(" │")) > 10, f"{stage} has no help text"


def test_demo_trains_scores_and_draws(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--epochs", "3", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout.strip().splitlines()[-1])
    # An 8x8 binarised digit has 64 binary pixels: a trained model must beat the uniform 64*log 2 nats.
    assert 5 < res["test_nll"] < 64 * 0.6931
    assert res["test_nll"] <= -res["test_elbo"] + 0.5
    with Image.open(res["samples"]) as im:
        assert im.size == (400, 400)
    assert (tmp_path / "model.safetensors").stat().st_size > 10_000


def test_unbuilt_stage_says_so():
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 2
    assert "not available in this version yet" in result.output
