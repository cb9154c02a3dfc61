"""Data drift: the statistics on seeded data, the monitor, and a real node end to end.

The model is synthetic so the training distribution is known exactly: live data can
be drawn from it (no drift should be reported) or from a shifted copy. Its label is
`income + 10 * plan > 60`, so the shifted copy also changes the predicted class mix.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import tracemalloc
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from support import router_channel, running_node

from hybridroute.cli import main
from hybridroute.node.admin_client import NodeTarget
from hybridroute.node.admin_service import report_message
from hybridroute.node.drift import DriftMonitor, RingBuffer
from hybridroute.node.drift_cli import NodeDrift, json_lines
from hybridroute.node.drift_html import _PREDICTION
from hybridroute.node.drift_stats import PREDICTION_PREFIX, compare
from hybridroute.node.loading import LoadedModel
from hybridroute.node.modelconfig import (
    OOV_STATISTIC,
    TEXT_STATISTICS,
    Baseline,
    OutputSpec,
    read_baseline,
    write_baseline,
)
from hybridroute.node.packaging import package_model
from hybridroute.node.repository import ModelRepository
from hybridroute.node.samples import generate_tickets
from hybridroute.node.server import NodeServer
from hybridroute.protos import inference_pb2 as pb
from hybridroute.protos import inference_pb2_grpc as pb_grpc

FEATURES = ("age", "income", "wait", "score", "plan", "flag")
PREDICTION = "<prediction: label>"  # the default output of both models is `label`
TRIALS = 50


def draw(rng: np.random.Generator, n: int, *, shifted: bool = False) -> np.ndarray:
    """Rows of the training distribution; `shifted` moves income by half its standard
    deviation and changes the plan mix; nothing else."""
    plan_mix = (0.3, 0.3, 0.4) if shifted else (0.5, 0.3, 0.2)
    return np.column_stack(
        [
            rng.normal(40, 10, n),
            rng.normal(50 + (10 if shifted else 0), 20, n),
            rng.exponential(1.0, n),
            rng.uniform(0, 1, n),
            rng.choice(3, n, p=plan_mix).astype(float),
            (rng.uniform(size=n) < 0.3).astype(float),
        ]
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("drift-repo")
    x = draw(np.random.default_rng(0), 1000)
    y = (x[:, 1] + 10 * x[:, 4] > 60).astype(int)
    estimator = LogisticRegression(max_iter=1000).fit(x, y)
    package_model(estimator, name="loans", version=1, repo=root, input_name="input",
                  input_datatype="FP64", features=FEATURES, baseline_sample=x)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def loans(repo: Path) -> LoadedModel:
    return ModelRepository.load(repo).get("loans")


def verdicts(model: LoadedModel, live: np.ndarray, **options: int) -> dict[str, bool]:
    """Per feature (the prediction included), drifted? As the node records requests:
    their input rows and the outputs they were answered with."""
    monitor = DriftMonitor(window=options.get("window", 500), min_window=100)
    monitor.track(model)
    for chunk in np.array_split(live, 20):
        monitor.observe(model.name, 1, chunk, model.run(chunk))
    (report,) = monitor.report()
    assert report.status in {"ok", "drift"}
    return {f.feature: f.drift for f in report.features}


# ---------------------------------------------------------------- statistics


def test_no_drift_on_the_training_distribution_false_alarm_rate(loans: LoadedModel) -> None:
    """The model-level flag (any feature or the prediction, Bonferroni) over seeded
    trials of 500 live rows; the prediction alone alarms at most at its share."""
    alarms = predicted = 0
    for seed in range(1, TRIALS + 1):
        found = verdicts(loans, draw(np.random.default_rng(seed), 500))
        assert list(found) == [*FEATURES, PREDICTION]
        alarms += any(found.values())
        predicted += found[PREDICTION]
    rate = alarms / TRIALS
    print(f"false-alarm rate: {alarms}/{TRIALS} = {rate:.0%} (alpha 5%, Bonferroni over 7)")
    assert rate <= 0.10
    assert predicted <= 2, predicted  # 5%/7 per window: 0.36 expected in 50


def test_shifted_features_are_detected_and_only_those(loans: LoadedModel) -> None:
    for seed in range(100, 105):
        found = verdicts(loans, draw(np.random.default_rng(seed), 500, shifted=True))
        drifted = {name for name, drift in found.items() if drift}
        assert drifted == {"income", "plan", PREDICTION}, seed


def test_tests_follow_evidently_defaults() -> None:
    rng = np.random.default_rng(7)
    small, large = draw(rng, 800), draw(rng, 3000)
    tests = {r.feature: r.test for r in compare(FEATURES, small, draw(rng, 300))}
    assert tests == {"age": "ks", "income": "ks", "wait": "ks", "score": "ks",
                     "plan": "chisquare", "flag": "z"}  # fmt: skip
    results = {r.feature: r for r in compare(FEATURES, large, draw(rng, 2000, shifted=True))}
    assert results["income"].test == "wasserstein" and results["plan"].test == "jensenshannon"
    assert results["income"].drift and results["income"].threshold == 0.1
    assert not results["age"].drift  # an effect size, not a p-value: no alarm on noise
    assert results["age"].threshold == 0.1 and results["flag"].test == "jensenshannon"
    ks = compare(FEATURES, small, draw(rng, 300))[0]
    assert ks.threshold == pytest.approx(0.05 / 6)  # Bonferroni


def test_missing_values_raise_an_alarm(loans: LoadedModel) -> None:
    """NaN is not a value the value tests can see: its share is tested on its own."""
    live = draw(np.random.default_rng(8), 500)
    live[:, 1] = np.nan  # upstream lost income entirely
    monitor = DriftMonitor(window=500, min_window=100)
    monitor.track(loans)
    monitor.observe("loans", 1, live)
    (report,) = monitor.report()
    assert report.status == "drift" and report.drift
    found = {f.feature: f for f in report.features}
    assert found["income missing"].drift and found["income missing"].test == "missing"
    assert found["income missing"].current_shares[:2] == (0.0, 1.0)
    assert not any(f.drift for name, f in found.items() if name != "income missing")
    # A share of missing values the reference also has is no alarm; a new one is, and
    # these tests count in the Bonferroni correction.
    rng = np.random.default_rng(9)
    reference, current = draw(rng, 800), draw(rng, 400)
    reference[rng.uniform(size=800) < 0.1, 0] = np.nan
    current[rng.uniform(size=400) < 0.1, 0] = np.nan
    results = {r.feature: r for r in compare(FEATURES, reference, current)}
    assert not results["age missing"].drift and "score missing" not in results
    assert results["age"].threshold == pytest.approx(0.05 / 7)
    current[rng.uniform(size=400) < 0.2, 3] = np.nan
    results = {r.feature: r for r in compare(FEATURES, reference, current)}
    assert results["score missing"].drift and not results["score"].drift
    assert results["score missing"].threshold == pytest.approx(0.05 / 8)


def test_not_enough_data_below_the_minimum_window(loans: LoadedModel) -> None:
    monitor = DriftMonitor(window=500, min_window=100)
    monitor.track(loans)
    monitor.observe("loans", 1, draw(np.random.default_rng(3), 99, shifted=True))
    (report,) = monitor.report()
    assert report.status == "not enough data" and report.window == 99 and not report.drift
    assert all(math.isnan(f.statistic) and not f.drift for f in report.features)
    assert all(f.current_shares == () and f.reference_shares for f in report.features)
    monitor.observe("loans", 1, draw(np.random.default_rng(4), 1, shifted=True))
    assert monitor.report()[0].status in {"ok", "drift"}


def test_a_small_window_reveals_no_request_values(loans: LoadedModel) -> None:
    """One request below the minimum window: its histogram shares would pin its values;
    nothing in the report may depend on them (not even the test chosen)."""
    reports = []
    for row in ([[39.0, 51.0, 0.7, 0.5, 2.0, 1.0]], [[20.0, 99.0, 3.0, 0.1, 0.0, 0.0]]):
        monitor = DriftMonitor(window=500, min_window=100)
        monitor.track(loans)
        monitor.observe("loans", 1, np.array(row))
        (report,) = monitor.report()
        assert report.status == "not enough data" and report.window == 1
        reports.append([(f.feature, f.test, f.current_shares) for f in report.features])
    assert reports[0] == reports[1]
    assert all(shares == () for _, _, shares in reports[0])


def test_the_window_slides(loans: LoadedModel) -> None:
    buffer = RingBuffer(5, 1)
    for start in (0, 3, 6):
        buffer.append(np.arange(start, start + 3, dtype=float).reshape(-1, 1))
    assert sorted(buffer.rows().ravel().tolist()) == [4, 5, 6, 7, 8]
    buffer.append(np.arange(100, 120, dtype=float).reshape(-1, 1))
    assert sorted(buffer.rows().ravel().tolist()) == [115, 116, 117, 118, 119]
    # Drift comes and goes with the window: shifted rows age out.
    monitor = DriftMonitor(window=300, min_window=100)
    monitor.track(loans)
    monitor.observe("loans", 1, draw(np.random.default_rng(5), 300, shifted=True))
    assert monitor.report()[0].drift
    monitor.observe("loans", 1, draw(np.random.default_rng(6), 300))
    assert not monitor.report()[0].drift


def test_prediction_drift_follows_the_predicted_class_mix(loans: LoadedModel) -> None:
    """The label is categorical (two classes: a z-test), tested in the same family."""
    monitor = DriftMonitor(window=500, min_window=100)
    monitor.track(loans)
    live = draw(np.random.default_rng(21), 500)
    monitor.observe("loans", 1, live, loans.run(live))
    (report,) = monitor.report()
    row = report.features[-1]
    assert (row.feature, row.test, row.categorical, row.drift) == (PREDICTION, "z", True, False)
    assert row.threshold == pytest.approx(0.05 / 7) and report.status == "ok"
    # Rows the model mostly labels 1 (plan 2 pushes income + 10 * plan over 60), with
    # income and plan as in training: only their mix, and so the prediction's, moves.
    pool = draw(np.random.default_rng(22), 4000)
    labels = loans.run(pool)["label"]
    ones, zeros = pool[labels == 1], pool[labels == 0]
    live = np.concatenate([ones[:400], zeros[:100]])
    monitor.observe("loans", 1, live, loans.run(live))
    (report,) = monitor.report()
    row = report.features[-1]
    assert row.feature == PREDICTION and row.drift and report.drift
    assert row.reference_shares[1] < 0.5 and row.current_shares[1] == pytest.approx(0.8)
    # The prediction row needs min_window predictions of its own: a request that asked
    # for other outputs only brings its inputs, not the default output.
    monitor = DriftMonitor(window=500, min_window=100)
    monitor.track(loans)
    live = draw(np.random.default_rng(23), 300, shifted=True)
    monitor.observe("loans", 1, live[:250], loans.run(live[:250], ["probabilities"]))
    monitor.observe("loans", 1, live[250:], loans.run(live[250:]))
    (report,) = monitor.report()
    row = report.features[-1]
    assert report.status == "drift" and report.window == 300
    assert row.feature == PREDICTION and math.isnan(row.statistic) and not row.drift
    assert row.current_shares == ()  # 50 predictions: no live histogram either
    answer = NodeDrift(NodeTarget("node", "localhost:1"), (report_message(report),))
    records = {r["feature"]: r for r in json_lines([answer])}
    assert records["income"]["status"] == "drift"
    assert records[PREDICTION]["status"] == "not enough data"
    assert records[PREDICTION]["statistic"] is None and records[PREDICTION]["drift"] is False


def test_text_models_drift_on_text_statistics(model_repo: Path) -> None:
    model = ModelRepository.load(model_repo).get("ticket-triage")
    monitor = DriftMonitor(window=300, min_window=100)
    monitor.track(model)
    texts, _ = generate_tickets(300, seed=11)
    monitor.observe("ticket-triage", 1, np.array([t.encode() for t in texts], dtype=object))
    (report,) = monitor.report()
    assert report.baseline_kind == "text-stats" and report.status == "ok"
    shouted = [t.upper() + " !!!" for t in texts]
    monitor.observe("ticket-triage", 1, np.array([t.encode() for t in shouted], dtype=object))
    drifted = {f.feature for f in monitor.report()[0].features if f.drift}
    assert "upper_fraction" in drifted and "n_words" not in drifted


def text_report(model: LoadedModel, texts: list[str]) -> dict[str, bool]:
    monitor = DriftMonitor(window=300, min_window=100)
    monitor.track(model)
    rows = np.array([t.encode() for t in texts], dtype=object)
    monitor.observe(model.name, 1, rows, model.run(rows))
    (report,) = monitor.report()
    assert report.status in {"ok", "drift"}
    return {f.feature: f.drift for f in report.features}


def test_out_of_vocabulary_share_uses_the_models_own_vocabulary(model_repo: Path) -> None:
    model = ModelRepository.load(model_repo).get("ticket-triage")
    baseline = read_baseline(model.path / "baseline.npz")
    assert baseline.columns == (*TEXT_STATISTICS, OOV_STATISTIC)
    assert 0 < baseline.values[:, -1].mean() < 0.5  # shares, measured out of fold
    # Fresh tickets from the training distribution: the baseline was cross-fitted, so
    # they do not look less familiar than the training texts did (no false alarm).
    alarms = 0
    for seed in range(11, 31):
        texts, _ = generate_tickets(300, seed=seed)
        alarms += text_report(model, texts)[OOV_STATISTIC]
    assert alarms <= 1, alarms
    # Same shape and characters, unseen words: only the vocabulary share moves.
    rng = np.random.default_rng(5)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    unseen = []
    for text in generate_tickets(300, seed=12)[0]:
        words = ["".join(rng.choice(letters, len(w))) for w in text.lower().split()]
        unseen.append(" ".join(words))
    found = text_report(model, unseen)
    assert found[OOV_STATISTIC] and not found["n_words"]


def test_models_without_a_vocabulary_have_no_oov_feature(model_repo: Path, tmp_path: Path) -> None:
    texts, labels = generate_tickets(200, seed=3)
    hashing = make_pipeline(HashingVectorizer(n_features=2**12), LogisticRegression())
    package_model(hashing.fit(texts, labels), name="hashed", version=1, repo=tmp_path,
                  input_name="text", input_datatype="BYTES", baseline_sample=texts)  # fmt: skip
    # A baseline written before the OOV statistic existed keeps working as it did.
    shutil.copytree(model_repo / "ticket-triage", tmp_path / "ticket-triage")
    path = tmp_path / "ticket-triage/1/baseline.npz"
    new = read_baseline(path)
    old = Baseline(new.kind, TEXT_STATISTICS, new.values[:, :-1], new.predictions)
    write_baseline(path, old)
    repo = ModelRepository.load(tmp_path)
    for name in ("hashed", "ticket-triage"):
        model = repo.get(name)
        assert read_baseline(model.path / "baseline.npz").columns == TEXT_STATISTICS
        found = text_report(model, generate_tickets(300, seed=11)[0])
        assert list(found) == [*TEXT_STATISTICS, PREDICTION] and not any(found.values()), name


def test_text_predictions_drift_when_the_topic_mix_changes(model_repo: Path) -> None:
    """For a text model the predicted label (4 string classes: chi-square) is the drift
    signal tied to its behaviour: tickets from the training distribution show none,
    a day of billing tickets only is flagged on the prediction row."""
    model = ModelRepository.load(model_repo).get("ticket-triage")
    texts, labels = generate_tickets(1200, seed=11)
    assert not text_report(model, texts[:300])[PREDICTION]
    monitor = DriftMonitor(window=300, min_window=100)
    monitor.track(model)
    billing = [t.encode() for t, label in zip(texts, labels, strict=True) if label == "billing"]
    rows = np.array(billing[:300], dtype=object)
    monitor.observe(model.name, 1, rows, model.run(rows))
    (report,) = monitor.report()
    row = report.features[-1]
    assert (row.feature, row.test, row.categorical, row.drift) == (
        PREDICTION,
        "chisquare",
        True,
        True,
    )
    # Classes are numbered by their rank among the baseline's (account, billing, ...):
    # the chart's bins are those numbers, the live share of "billing" is the second.
    assert row.bin_edges == (0.0, 1.0, 2.0, 3.0) and row.current_shares[1] > 0.9


def test_no_prediction_row_without_comparable_predictions(
    repo: Path, loans: LoadedModel, tmp_path: Path
) -> None:
    """A baseline without predictions (an older or hand-made one) loads and is watched
    on its inputs only; so is a version whose default output has several values per
    row. A binary classifier's probabilities are compared on the positive class's."""
    shutil.copytree(repo / "loans", tmp_path / "loans")
    path = tmp_path / "loans/1/baseline.npz"
    full = read_baseline(path)
    np.savez_compressed(path, kind=np.array(full.kind), columns=np.array(full.columns),
                        values=full.values)  # fmt: skip
    assert read_baseline(path).predictions.size == 0
    x = draw(np.random.default_rng(0), 1000)
    proba = OutputSpec(name="probabilities", datatype="FP64", shape=(-1, 3), method="predict_proba",
                       default=True)  # fmt: skip
    three = LogisticRegression(max_iter=1000).fit(x, x[:, 4].astype(int))
    package_model(three, name="plans", version=1, repo=tmp_path, input_name="input",
                  input_datatype="FP64", features=FEATURES, baseline_sample=x,
                  outputs=[proba])  # fmt: skip
    binary = proba.model_copy(update={"shape": (-1, 2)})
    package_model(loans.estimator, name="scores", version=1, repo=tmp_path, input_name="input",
                  input_datatype="FP64", features=FEATURES, baseline_sample=x,
                  outputs=[binary])  # fmt: skip
    models = ModelRepository.load(tmp_path)
    live = draw(np.random.default_rng(31), 400, shifted=True)
    for name in ("loans", "plans", "scores"):
        model = models.get(name)
        found = verdicts(model, live)
        expected = [*FEATURES, "<prediction: probabilities[1]>"] if name == "scores" else FEATURES
        assert list(found) == list(expected), name
        assert found["income"] and found["plan"], name
    scores = DriftMonitor(window=500, min_window=100)
    scores.track(models.get("scores"))
    scores.observe("scores", 1, live, models.get("scores").run(live))
    row = scores.report()[0].features[-1]
    assert row.test == "ks" and not row.categorical and row.drift  # a probability: numeric
    assert _PREDICTION == PREDICTION_PREFIX


# ----------------------------------------------------------- node end to end


@pytest.fixture(scope="module")
def node(repo: Path, pki: Path) -> Iterator[NodeServer]:
    with running_node(
        repo,
        pki,
        allow_clients=("router",),
        metrics_listen="127.0.0.1:0",
        drift_window=400,
        drift_min_window=100,
        drift_interval=0.1,
    ) as server:
        yield server


def send(node: NodeServer, pki: Path, rows: np.ndarray) -> None:
    with router_channel(node, pki) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for chunk in np.array_split(rows, len(rows) // 10):
            request = pb.ModelInferRequest(model_name="loans")
            tensor = request.inputs.add(name="input", datatype="FP64", shape=list(chunk.shape))
            tensor.contents.fp64_contents.extend(chunk.ravel().tolist())
            stub.ModelInfer(request, timeout=10)


def cli_args(node: NodeServer, pki: Path) -> list[str]:
    return ["--node", f"localhost:{node.port}", "--ca", str(pki / "ca.pem"),
            "--cert", str(pki / "router.pem"), "--key", str(pki / "router.key")]  # fmt: skip


def test_node_reports_drift_in_metrics_logs_cli_and_html(
    node: NodeServer,
    pki: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert main(["drift", "report", *cli_args(node, pki), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {ln["status"] for ln in lines} == {"not enough data"}
    assert all(ln["statistic"] is None and ln["drift"] is False for ln in lines)
    assert main(["drift", "report", *cli_args(node, pki)]) == 0
    assert "loans/1: window too small (0 of at least 100 live rows)" in capsys.readouterr().out
    live = draw(np.random.default_rng(42), 400, shifted=True)
    with caplog.at_level(logging.INFO, logger="hybridroute.node.drift"):
        send(node, pki, live)
        time.sleep(0.5)  # several periodic evaluations
        assert main(["drift", "report", *cli_args(node, pki), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    keys = {"node", "model", "version", "feature", "test", "statistic", "threshold", "window",
            "drift"}  # fmt: skip
    assert all(keys <= set(ln) for ln in lines) and len(lines) == len(FEATURES) + 1
    assert [ln["feature"] for ln in lines] == [*FEATURES, PREDICTION]
    assert {ln["feature"] for ln in lines if ln["drift"]} == {"income", "plan", PREDICTION}
    assert all(ln["window"] == 400 and isinstance(ln["drift"], bool) for ln in lines)
    assert lines[-1]["test"] == "z" and lines[-1]["status"] == "drift"
    warnings = [r.getMessage() for r in caplog.records if "drift detected" in r.getMessage()]
    assert len(warnings) == 1, warnings  # logged once, not at every evaluation
    assert "income (ks p=" in warnings[0] and "plan (chisquare p=" in warnings[0]
    assert f"{PREDICTION} (z p=" in warnings[0]
    assert f"{live[0, 1]:.3g}" not in warnings[0]  # statistics only, no input values

    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert (
        'hybridroute_node_drift_detected{feature="income",model="loans",test="ks",version="1"} 1.0'
        in text
    )
    assert (
        'hybridroute_node_drift_detected{feature="age",model="loans",test="ks",version="1"} 0.0'
        in text
    )
    assert (
        'hybridroute_node_drift_statistic{feature="flag",model="loans",test="z",version="1"}'
        in text
    )
    assert (
        'hybridroute_node_drift_detected{feature="<prediction: label>",model="loans",test="z",'
        'version="1"} 1.0' in text
    )
    assert 'hybridroute_node_drift_model_detected{model="loans",version="1"} 1.0' in text
    assert 'hybridroute_node_drift_window_rows{model="loans",version="1"} 400.0' in text

    page = tmp_path / "drift.html"
    assert main(["drift", "report", *cli_args(node, pki), "--html", str(page)]) == 0
    table = capsys.readouterr().out
    assert (
        f"loans/1: drift in income, plan, {PREDICTION} (400 live rows vs 1000 reference rows)"
        in table
    )
    assert f"{PREDICTION}  z" in table
    html = page.read_text()
    assert html.count("<svg") == len(FEATURES) + 1 == html.count("<figcaption>")
    assert "<b>&lt;prediction: label&gt;</b>: z p-value" in html
    assert "<script" not in html and "href=" not in html and "src=" not in html


def test_node_shows_no_prediction_drift_on_the_training_distribution(
    node: NodeServer, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole window (400 rows) of requests drawn from the training distribution."""
    send(node, pki, draw(np.random.default_rng(43), 400))
    time.sleep(0.3)
    assert main(["drift", "report", *cli_args(node, pki), "--json"]) == 0
    lines = {ln["feature"]: ln for ln in map(json.loads, capsys.readouterr().out.splitlines())}
    row = lines[PREDICTION]
    assert row["status"] == "ok" and row["drift"] is False and row["statistic"] > row["threshold"]
    assert row["window"] == 400 and row["test"] == "z" and row["score_kind"] == "p_value"


def test_drift_report_is_for_admins_only(node: NodeServer, pki: Path, capsys) -> None:
    args = ["drift", "report", "--node", f"localhost:{node.port}", "--ca", str(pki / "ca.pem"),
            "--cert", str(pki / "app-demo-app.pem"), "--key", str(pki / "app-demo-app.key"),
            "--json"]  # fmt: skip
    assert main(args) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "PERMISSION_DENIED"


def test_drift_report_of_a_version_not_loaded_is_an_error_with_its_message(
    node: NodeServer, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["drift", "report", *cli_args(node, pki)]
    assert main([*args, "--model", "loans", "--version", "5"]) == 1
    out = capsys.readouterr().out
    assert "NOT_FOUND: no loaded version 5 of model 'loans' on this node" in out
    assert main(["drift", "report", *cli_args(node, pki), "--model", "nope"]) == 1
    assert "NOT_FOUND: unknown model 'nope'" in capsys.readouterr().out
    assert main(["drift", "report", *cli_args(node, pki), "--version", "1"]) == 0


def test_drift_report_json_names_the_oov_feature(
    model_repo: Path, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_node(model_repo, pki, allow_clients=("router",)) as server:
        args = ["drift", "report", *cli_args(server, pki), "--model", "ticket-triage", "--json"]
        assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [ln["feature"] for ln in lines] == [*TEXT_STATISTICS, OOV_STATISTIC, PREDICTION]
    assert {ln["model"] for ln in lines} == {"ticket-triage"}


def test_the_recorder_backlog_is_bounded_in_bytes_not_requests(model_repo: Path) -> None:
    """60 requests of 8 texts of 1 MB arrive faster than they are recorded (the monitor
    is not started, so nothing is): the backlog holds about 32 MiB, not 480 MB, and
    the rows it could not take are counted as dropped."""
    model = ModelRepository.load(model_repo).get("ticket-triage")
    monitor = DriftMonitor(window=300, min_window=10)
    monitor.track(model)
    text = ("my parcel never arrived, where is it? " * 30_000).encode()[:1_000_000]
    rows = np.array([text] * 8, dtype=object)
    for _ in range(60):
        monitor.observe("ticket-triage", 1, rows)
    (report,) = monitor.report()  # records the backlog first
    kept = 480 - report.dropped
    assert 8 <= kept <= 40, f"{kept} texts of 1 MB were held for the recorder"
    assert report.window == kept
    assert monitor.backlog == (0, 0, 0)


def test_a_request_larger_than_the_window_queues_only_what_the_window_keeps(
    loans: LoadedModel,
) -> None:
    monitor = DriftMonitor(window=300, min_window=100)
    monitor.track(loans)
    live = draw(np.random.default_rng(5), 5000)
    monitor.observe(loans.name, 1, live)
    requests, rows, size = monitor.backlog
    assert (requests, rows) == (1, 300) and size == live[-300:].nbytes
    (report,) = monitor.report()
    assert report.window == 300 and report.dropped == 0


def _held_by_backlog(monitor: DriftMonitor, requests: Iterator[tuple[object, dict]]) -> int:
    """Bytes still allocated after `requests` were observed and dropped by the caller:
    what the backlog keeps alive (the monitor is not started, so nothing is recorded)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for rows, outputs in requests:
            monitor.observe("m", 1, rows, outputs)
        del rows, outputs
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


BUDGET = 4 * 1024 * 1024
SLACK = 64 * 1024  # the backlog's own tuples and dicts


def test_the_backlog_holds_no_more_than_it_counts_when_requests_outgrow_the_window() -> None:
    # 40 requests of 5000 rows (1.6 MB each) for a window of 100: the backlog used to
    # keep 100-row views of them, counting 32 KB each while holding 1.6 MB.
    monitor = DriftMonitor(window=100, min_window=10, backlog_bytes=BUDGET)
    rng = np.random.default_rng(0)
    held = _held_by_backlog(
        monitor,
        ((rng.normal(size=(5000, 40)), {"label": np.zeros(5000)}) for _ in range(40)),
    )
    requests, rows, counted = monitor.backlog
    assert (requests, rows) == (40, 4000)
    assert counted <= BUDGET
    assert held <= counted + SLACK, f"held {held} bytes, counted {counted}"
    item = monitor._backlog.get()
    assert item is not None and item[2].base is None and item[3]["label"].base is None


def test_the_backlog_holds_no_more_than_it_counts_for_outputs_cut_from_a_batch() -> None:
    # A caller's outputs are its rows of the whole batch's output: a view that would
    # keep the batch's output alive (here 4 MB of probabilities) for a 1-row request.
    monitor = DriftMonitor(window=100, min_window=10, backlog_bytes=BUDGET)
    rng = np.random.default_rng(1)

    def requests() -> Iterator[tuple[object, dict]]:
        for _ in range(20):
            batch = rng.random((5000, 100))
            yield rng.normal(size=(1, 40)), {"proba": batch[7:8]}

    held = _held_by_backlog(monitor, requests())
    counted = monitor.backlog[2]
    assert monitor.backlog[0] == 20
    assert held <= counted + SLACK, f"held {held} bytes, counted {counted}"


def test_the_backlog_counts_texts_by_the_memory_they_take() -> None:
    # 4-byte characters: len() counted a quarter of the text; many short texts: their
    # object headers, which len() did not count at all.
    monitor = DriftMonitor(window=1000, min_window=10, backlog_bytes=BUDGET)

    def requests() -> Iterator[tuple[object, dict]]:
        for i in range(20):
            texts = np.empty(1000, dtype=object)
            texts[:] = [f"{i}-{j}" for j in range(1000)]
            yield texts, {}
        for i in range(20):
            texts = np.empty(8, dtype=object)
            texts[:] = [f"{i}-{j} " + "\N{GRINNING FACE}" * 20_000 for j in range(8)]
            yield texts, {}

    held = _held_by_backlog(monitor, requests())
    requests_, _, counted = monitor.backlog
    assert requests_ < 40 and counted <= BUDGET  # the budget took fewer than all
    assert held <= counted + SLACK, f"held {held} bytes, counted {counted}"
