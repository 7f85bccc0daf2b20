"""What a deployment's user reads: the lines train-vae and evaluate-vae send to Prefect's API, read back from it
as `prefect flow-run logs` and the UI show them (a flow run, its tasks' lines included)."""

from __future__ import annotations

import logging
import re
from uuid import UUID

import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")

SMALL = ["model.hidden_channels=[16,32]", "model.hidden_dim=64", "model.latent_dim=8", "train.batch_size=64",
         "train.kl_warmup_steps=20", "train.log_every=5"]
EPOCH = r"^epoch (\d+)/2: loss [\d.]+, val loss [\d.]+, beta [\d.e-]+, [\d,]+ images/s, (\d+ min )?\d+ s left$"


def _logs(flow_run_id: UUID) -> list[str]:
    """The messages Prefect's API holds for a flow run, its tasks' included, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the handler ships records in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]


def _run(flow, *args, **kwargs) -> tuple[object, list[str]]:
    """The flow's result and the log lines of its run."""
    state = flow(*args, return_state=True, **kwargs)
    return state.result(), _logs(state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_home):
    """train-vae, 2 epochs of 600 MNIST images on one Ray worker, as a deployment runs it (progress off):
    (result, its run's log lines). 16 steps in all, against a KL warm-up of 20: training ends with β 0.8."""
    from flows.train import train_vae
    from vae_core.requests import TrainRequest

    with mnist_home(tmp_path_factory.mktemp("logs_home"), limit=600):
        from flows.tracking import runs as tracking

        tracking.configure()
        yield _run(train_vae, TrainRequest(dataset="mnist", overrides=SMALL, epochs=2, workers=1, max_failures=0))


@pytest.mark.slow
def test_train_logs_a_line_per_epoch(trained):
    """One line per finished epoch, with its loss, val loss, images/s and time left."""
    out, lines = trained
    assert [int(m[1]) for line in lines if (m := re.match(EPOCH, line))] == [1, 2], lines


@pytest.mark.slow
def test_a_run_ending_below_its_kl_target_says_so_in_the_log_the_run_and_the_result(trained):
    import mlflow

    out, lines = trained
    (warning,) = out.warnings
    assert warning.startswith("training ended with beta 0.8, below its target 1 (its KL warm-up is 20 steps "
                              "and the run 16)"), warning
    assert f"warning: {warning}" in lines
    assert mlflow.MlflowClient().get_run(out.run_id).data.tags["warning/kl_warmup"] == warning


@pytest.mark.slow
def test_evaluate_logs_its_slow_steps_and_the_gate(trained):
    """evaluate-vae's feature classifier, scoring and report say when they start and how long they took, and
    the gate's decision is a line: the verdict, the metric, and the reason."""
    from flows.evaluate import evaluate_vae
    from vae_core.requests import EvaluateRequest

    model, _ = trained
    out, lines = _run(evaluate_vae, EvaluateRequest(model=f"models:/{model.model_name}/{model.model_version}",
                                                    iw_samples=2, limit=64, map_points=10, sample_rows=64))
    text = "\n".join(lines)
    for step in ("feature classifier of mnist", f"scoring v{model.model_version} on 64 test images",
                 "pictures and the HTML report"):
        assert re.search(rf"^{step}.* \.\.\.$", text, re.M) and re.search(rf"^{step}.*: done in ", text, re.M), text
    nll = out.metrics["test/nll_k2"]
    assert f"champion gate: v{model.model_version} promoted: test/nll_k2 {nll:.4g} against no champion " \
           f"(margin 0): {out.decision.reason}" in lines, text


class _Seen(logging.Handler):
    """The messages that reach the root logger, where Prefect's console handler is."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_progress_lines_reach_the_api_not_the_console(capsys):
    """With `progress` a line is printed plain on stderr, and reaches the flow run's log without a second copy in
    Prefect's console (whose handler is on the root logger, where the run's other lines arrive)."""
    from prefect import flow, get_run_logger

    from flows.run_log import run_lines

    @flow(name="progress-lines")
    def say() -> None:
        get_run_logger().info("a console line")
        run_lines(progress=True)("epoch 1/1: a line")

    console = _Seen()
    logging.getLogger().addHandler(console)
    try:
        _, lines = _run(say)
    finally:
        logging.getLogger().removeHandler(console)
    assert "epoch 1/1: a line" in lines, lines
    assert capsys.readouterr().err.count("epoch 1/1: a line") == 1
    assert "a console line" in console.messages and "epoch 1/1: a line" not in console.messages, console.messages
