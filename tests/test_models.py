"""Model repository format, safe loading, sample models and packaging (node/)."""

from __future__ import annotations

import logging
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import skops.io as sio
import yaml
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from hybridroute.cli import main
from hybridroute.config import ConfigError, load_yaml, validate
from hybridroute.node.loading import (
    InputDecodeError,
    InvalidRequestError,
    ModelLoadError,
    load_version,
)
from hybridroute.node.modelconfig import ModelConfig, read_baseline
from hybridroute.node.packaging import PackagingError, VersionExistsError, package_model
from hybridroute.node.repository import (
    ModelNotFound,
    ModelNotReady,
    ModelRepository,
    VersionEntry,
    scan_repository,
)
from hybridroute.node.samples import SampleModel, generate_tickets, write_samples

IRIS_X, IRIS_Y = load_iris(return_X_y=True)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SampleModel]]:
    root = tmp_path_factory.mktemp("samples")
    return root, write_samples(root)


@pytest.fixture(scope="module")
def repo(samples: tuple[Path, list[SampleModel]]) -> ModelRepository:
    return ModelRepository.load(samples[0])


@pytest.fixture
def repo_copy(samples: tuple[Path, list[SampleModel]], tmp_path: Path) -> Path:
    """A private copy of the sample repository, free to break."""
    return Path(shutil.copytree(samples[0], tmp_path / "repo"))


def edit_yaml(path: Path, **changes: Any) -> None:
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def by_name(entries: list[VersionEntry]) -> dict[str, VersionEntry]:
    return {f"{e.name}/{e.version}": e for e in entries}


# ------------------------------------------------------------------- sample models


def test_samples_are_written_and_load_ready(samples: tuple[Path, list[SampleModel]]) -> None:
    root, written = samples
    assert [(s.name, s.version) for s in written] == [("iris", 1), ("ticket-triage", 1)]
    assert all(s.accuracy > 0.85 for s in written)
    for sample in written:
        assert sorted(p.name for p in sample.path.iterdir()) == [
            "baseline.npz",
            "model.skops",
            "model.yaml",
        ]
    entries = scan_repository(root)
    assert [(e.name, e.version, e.state, e.reason) for e in entries] == [
        ("iris", 1, "READY", ""),
        ("ticket-triage", 1, "READY", ""),
    ]


def test_sample_trusted_types_are_exactly_what_skops_reports(repo: ModelRepository) -> None:
    for name in ("iris", "ticket-triage"):
        model = repo.get(name)
        found = sorted(sio.get_untrusted_types(file=model.path / "model.skops"))
        assert list(model.config.trusted_types or ()) == found
    assert repo.get("iris").config.trusted_types == ("sklearn.tree._tree.Tree",)


def test_iris_predictions_equal_a_freshly_trained_estimator(repo: ModelRepository) -> None:
    x_train, _, y_train, _ = train_test_split(
        IRIS_X, IRIS_Y, test_size=0.25, random_state=0, stratify=IRIS_Y
    )
    fresh = RandomForestClassifier(n_estimators=50, random_state=0).fit(x_train, y_train)
    model = repo.get("iris")
    out = model.run(IRIS_X, ["label", "probabilities"])
    assert out["label"].dtype == np.int64 and out["label"].shape == (150,)
    assert out["probabilities"].dtype == np.float64 and out["probabilities"].shape == (150, 3)
    np.testing.assert_array_equal(out["label"], fresh.predict(IRIS_X))
    np.testing.assert_array_equal(out["probabilities"], fresh.predict_proba(IRIS_X))
    assert list(model.run(IRIS_X[:2])) == ["label"]  # only the default output


def test_ticket_triage_run_shapes_and_dtypes(repo: ModelRepository) -> None:
    texts, _ = generate_tickets(40, seed=7)
    model = repo.get("ticket-triage")
    batch = np.array([t.encode() for t in texts], dtype=object)
    out = model.run(batch, ["probabilities", "label"])
    assert list(out) == ["probabilities", "label"]
    labels = out["label"]
    assert labels.dtype == object and labels.shape == (40,)
    assert all(isinstance(v, bytes) for v in labels)
    expected = [s.encode() for s in model.estimator.predict(texts)]
    assert labels.tolist() == expected
    assert out["probabilities"].shape == (40, 4) and out["probabilities"].dtype == np.float64
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0)


def test_bytes_input_that_is_not_utf8_is_refused_without_echoing_it(
    repo: ModelRepository,
) -> None:
    batch = np.array([b"fine", b"\xff\xfesecret"], dtype=object)
    with pytest.raises(InputDecodeError, match="input 'text' element 1") as info:
        repo.get("ticket-triage").run(batch, ["label"])
    assert isinstance(info.value, ValueError)
    assert "secret" not in str(info.value)


def test_run_refuses_unknown_outputs_and_wrong_shapes(repo: ModelRepository) -> None:
    iris = repo.get("iris")
    with pytest.raises(InvalidRequestError, match="no output 'colour'"):
        iris.run(IRIS_X[:1], ["colour"])
    with pytest.raises(InvalidRequestError, match=r"shape \[-1, 4\], got \[2, 3\]"):
        iris.run(IRIS_X[:2, :3], [])


def test_run_is_thread_safe(repo: ModelRepository) -> None:
    iris = repo.get("iris")
    expected = iris.run(IRIS_X, ["probabilities"])["probabilities"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: iris.run(IRIS_X, ["probabilities"]), range(16)))
    for result in results:
        np.testing.assert_array_equal(result["probabilities"], expected)


def test_baselines(repo: ModelRepository) -> None:
    iris = read_baseline(repo.get("iris").path / "baseline.npz")
    assert iris.kind == "tabular"
    assert iris.columns == ("sepal_length", "sepal_width", "petal_length", "petal_width")
    assert iris.values.shape == (112, 4) and iris.values.dtype == np.float64
    assert iris.predictions.shape == (112,)
    tickets_path = repo.get("ticket-triage").path / "baseline.npz"
    tickets = read_baseline(tickets_path)
    assert tickets.kind == "text-stats" and tickets.columns[0] == "n_chars"
    assert tickets.columns[-1] == "oov_fraction" and tickets.values.shape == (300, 7)
    assert set(tickets.predictions.tolist()) == {"account", "billing", "shipping", "technical"}
    with np.load(tickets_path, allow_pickle=False) as data:  # no raw texts are stored
        assert data["values"].dtype == np.float64
        assert not any("example.com" in str(data[k]) for k in data.files)


# -------------------------------------------------------------------- safe loading


def test_untrusted_type_is_refused_naming_it(repo_copy: Path) -> None:
    edit_yaml(repo_copy / "iris/1/model.yaml", trusted_types=[])
    entries = by_name(scan_repository(repo_copy))
    assert entries["ticket-triage/1"].state == "READY"
    iris = entries["iris/1"]
    assert iris.state == "UNAVAILABLE" and iris.model is None
    assert "iris/1: model.skops contains types not listed in trusted_types" in iris.reason
    assert "sklearn.tree._tree.Tree" in iris.reason


def _pickled_model(repo_copy: Path, allow: bool) -> Path:
    version_dir = repo_copy / "pickled" / "1"
    version_dir.mkdir(parents=True)
    estimator = load_version(repo_copy / "iris/1").estimator
    with (version_dir / "model.pkl").open("wb") as fh:
        pickle.dump(estimator, fh)
    for name in ("model.yaml", "baseline.npz"):
        shutil.copy(repo_copy / "iris/1" / name, version_dir / name)
    edit_yaml(
        version_dir / "model.yaml",
        name="pickled",
        file="model.pkl",
        format="pickle",
        allow_unsafe_pickle=allow,
    )
    return version_dir


def test_pickle_is_refused_unless_opted_in(repo_copy: Path) -> None:
    _pickled_model(repo_copy, allow=False)
    entry = by_name(scan_repository(repo_copy))["pickled/1"]
    assert entry.state == "UNAVAILABLE"
    assert "model.pkl is a pickle file" in entry.reason
    assert "allow_unsafe_pickle: true" in entry.reason


def test_pickle_loads_with_a_warning_when_opted_in(
    repo_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version_dir = _pickled_model(repo_copy, allow=True)
    with caplog.at_level(logging.WARNING, logger="hybridroute.node.loading"):
        model = load_version(version_dir)
    np.testing.assert_array_equal(
        model.run(IRIS_X)["label"], load_version(repo_copy / "iris/1").run(IRIS_X)["label"]
    )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("pickled/1" in r.getMessage() and "pickle" in r.getMessage() for r in warnings)


def test_corrupt_model_file_leaves_only_that_model_unavailable(
    repo_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (repo_copy / "iris/1/model.skops").write_bytes(b"not a zip file")
    with caplog.at_level(logging.ERROR, logger="hybridroute.node.repository"):
        repo = ModelRepository.load(repo_copy)
    [iris, tickets] = repo.index()
    assert tickets.state == "READY"
    assert iris.state == "UNAVAILABLE" and "model.skops is not a readable skops file" in iris.reason
    assert any("iris/1 UNAVAILABLE" in r.getMessage() for r in caplog.records)
    with pytest.raises(ModelNotReady, match="not a readable skops file"):
        repo.get("iris", "1")
    with pytest.raises(ModelNotReady, match="no READY version"):
        repo.get("iris")
    assert not repo.is_ready("iris") and repo.is_ready("ticket-triage")


def test_missing_model_file(repo_copy: Path) -> None:
    (repo_copy / "iris/1/model.skops").unlink()
    with pytest.raises(ModelLoadError, match=r"iris/1: estimator file model.skops not found"):
        load_version(repo_copy / "iris/1")


def test_unknown_key_in_model_yaml_names_file_line_and_key(repo_copy: Path) -> None:
    config = repo_copy / "ticket-triage/1/model.yaml"
    config.write_text(config.read_text() + "colour: blue\n")
    line = len(config.read_text().splitlines())
    entries = by_name(scan_repository(repo_copy))
    assert entries["iris/1"].state == "READY"
    broken = entries["ticket-triage/1"]
    assert broken.state == "UNAVAILABLE"
    assert f"{config}:{line}: colour: unknown key (allowed: name, version" in broken.reason


def test_declared_output_the_estimator_cannot_produce(repo_copy: Path) -> None:
    config = repo_copy / "ticket-triage/1/model.yaml"
    data = yaml.safe_load(config.read_text())
    data["outputs"].append(
        {"name": "embedding", "datatype": "FP64", "shape": [-1, 8], "method": "transform"}
    )
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ModelLoadError, match="needs method transform, which Pipeline does not"):
        load_version(config.parent)


def test_output_datatype_that_does_not_fit_fails_at_load(repo_copy: Path) -> None:
    config = repo_copy / "ticket-triage/1/model.yaml"
    data = yaml.safe_load(config.read_text())
    data["outputs"][0]["datatype"] = "INT64"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ModelLoadError, match=r"load check failed.*datatype INT64"):
        load_version(config.parent)


def test_directory_must_match_model_yaml(repo_copy: Path) -> None:
    shutil.copytree(repo_copy / "iris/1", repo_copy / "iris/5")
    (repo_copy / "iris/notaversion").mkdir()
    entries = by_name(scan_repository(repo_copy))
    assert "iris/5: model.yaml declares iris/1" in entries["iris/5"].reason
    assert sorted(entries) == ["iris/1", "iris/5", "ticket-triage/1"]


VALID = """\
name: m
version: 1
trusted_types: []
inputs: [{name: x, datatype: FP64, shape: [-1, 2]}]
outputs: [{name: y, datatype: INT64, shape: [-1], method: predict, default: true}]
features: [a, b]
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("features: [a, b]", "features: [a, b, c]", ":6: features: 3 names for input 'x'"),
        ("method: predict,", "method: predict_log,", ":5: outputs[0].method: Input should be"),
        ("default: true", "default: false", ":5: outputs: mark at least one output"),
        ("trusted_types: []\n", "", "m.yaml:1: trusted_types: required for format skops"),
        ("version: 1", "version: 0", ":2: version: Input should be greater than or equal to 1"),
        ("shape: [-1, 2]", "shape: [4, 2]", ":4: inputs[0].shape: the first dimension"),
        ("datatype: FP64", "datatype: FP65", ":4: inputs[0].datatype: Input should be"),
        ("name: m", "name: ../m", ":1: name: must start with a letter"),
        ("version: 1", "version: 1\nfile: ../x.skops", ":3: file: must be a file name"),
        (
            "features: [a, b]",
            "features: [a, b]\nbatching: {max_batch_size: 0}",
            ":7: batching.max_batch_size: Input should be greater than or equal to 1",
        ),
        (
            "features: [a, b]",
            "features: [a, b]\nbatching: {max_queue_delay_ms: .inf}",
            ":7: batching.max_queue_delay_ms: Input should be a finite number",
        ),
        (
            "inputs: [",
            "inputs: [{name: z, datatype: FP64, shape: [-1, 2]}, ",
            ":4: inputs: a scikit-learn estimator takes exactly one input",
        ),
        (
            "method: predict,",
            "method: predict_proba,",
            ":5: outputs[0].method: predict_proba returns floats",
        ),
    ],
)
def test_model_yaml_validation_messages(old: str, new: str, expected: str) -> None:
    assert old in VALID
    with pytest.raises(ConfigError) as info:
        validate(load_yaml("m.yaml", text=VALID.replace(old, new)), ModelConfig)
    assert expected in str(info.value)


def test_valid_model_yaml_parses() -> None:
    config = validate(load_yaml("m.yaml", text=VALID), ModelConfig)
    assert config.input.shape == (-1, 2) and config.default_outputs == ("y",)
    assert config.format == "skops" and config.file == "model.skops" and config.batching is None


# ---------------------------------------------------------------- version selection


def test_version_selection(repo_copy: Path) -> None:
    shutil.copytree(repo_copy / "iris/1", repo_copy / "iris/2")
    edit_yaml(repo_copy / "iris/2/model.yaml", version=2)
    shutil.copytree(repo_copy / "iris/1", repo_copy / "iris/10")
    edit_yaml(repo_copy / "iris/10/model.yaml", version=10)
    (repo_copy / "iris/10/model.skops").write_bytes(b"broken")
    repo = ModelRepository.load(repo_copy)
    assert repo.versions("iris") == [1, 2, 10]
    assert repo.versions("iris", ready_only=True) == [1, 2]
    assert repo.get("iris").version == 2  # newest READY (10 failed to load)
    assert repo.get("iris", "").version == 2
    assert repo.get("iris", "1").version == 1 and repo.get("iris", 2).version == 2
    with pytest.raises(ModelNotReady, match="version 10 is not ready"):
        repo.get("iris", "10")
    with pytest.raises(ModelNotFound, match=r"no version '3' \(available versions: 1, 2, 10\)"):
        repo.get("iris", "3")
    with pytest.raises(ModelNotFound, match="no version 'latest'"):
        repo.get("iris", "latest")
    with pytest.raises(ModelNotFound, match=r"unknown model 'roses' \(available models: iris, ti"):
        repo.get("roses")
    assert repo.knows("iris") and not repo.knows("roses") and repo.has_ready("iris")


def test_versions_beyond_int64_are_not_found_without_converting_them(repo_copy: Path) -> None:
    shutil.copytree(repo_copy / "iris/1", repo_copy / f"iris/{2**63}")  # not a version
    repo = ModelRepository.load(repo_copy)
    assert repo.versions("iris") == [1]
    for version in ("9" * 5000, str(2**63), "1" + "0" * 30):
        with pytest.raises(ModelNotFound, match=r"has no version '\d{0,40}'") as info:
            repo.get("iris", version)
        assert len(str(info.value)) < 120
    assert repo.get("iris", " 01 ").version == 1


# ---------------------------------------------------------------------- packaging


def test_package_model_refuses_overwrite_and_leaves_no_partial_versions(tmp_path: Path) -> None:
    estimator = LogisticRegression(max_iter=500).fit(IRIS_X, IRIS_Y)
    kwargs: dict[str, Any] = {
        "name": "lr",
        "repo": tmp_path,
        "input_name": "input",
        "input_datatype": "FP64",
        "features": ["a", "b", "c", "d"],
        "baseline_sample": IRIS_X,
    }
    path = package_model(estimator, version=3, **kwargs)
    assert path == tmp_path / "lr" / "3"
    assert (
        load_version(path).run(IRIS_X[:5])["label"].tolist()
        == estimator.predict(IRIS_X[:5]).tolist()
    )
    with pytest.raises(VersionExistsError, match="use --force"):
        package_model(estimator, version=3, **kwargs)
    with pytest.raises(PackagingError, match="3 columns"):
        package_model(estimator, version=4, **{**kwargs, "baseline_sample": IRIS_X[:, :3]})
    package_model(estimator, version=3, force=True, **kwargs)
    assert sorted(p.name for p in (tmp_path / "lr").iterdir()) == ["3"]  # no temp dirs left


def test_cli_models_sample_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "sample", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wrote iris version 1" in out and "wrote ticket-triage version 1" in out
    assert "held-out accuracy" in out
    before = (tmp_path / "iris/1/model.skops").stat().st_mtime_ns
    assert main(["models", "sample", "--out", str(tmp_path)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert (tmp_path / "iris/1/model.skops").stat().st_mtime_ns == before
    assert main(["models", "sample", "--out", str(tmp_path), "--force"]) == 0
    assert len(scan_repository(tmp_path)) == 2


def test_cli_models_package_joblib_with_csv_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    estimator_file = tmp_path / "lr.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(IRIS_X, IRIS_Y), estimator_file)
    sample = tmp_path / "train.csv"
    rows = "\n".join(",".join(str(v) for v in row) for row in IRIS_X)
    sample.write_text("sl,sw,pl,pw\n" + rows + "\n")
    repo = tmp_path / "repo"
    args = [
        "models", "package", "--estimator", str(estimator_file), "--name", "flowers",
        "--version", "2", "--out", str(repo), "--sample-data", str(sample),
    ]  # fmt: skip
    assert main(args) == 2
    assert "--allow-unsafe-pickle" in capsys.readouterr().err
    assert not repo.exists()
    assert main([*args, "--allow-unsafe-pickle", "--max-batch-size", "8"]) == 0
    assert "wrote flowers version 2" in capsys.readouterr().out
    model = ModelRepository.load(repo).get("flowers")
    assert model.config.features == ("sl", "sw", "pl", "pw")
    assert model.config.format == "skops" and model.config.trusted_types == ()
    assert model.config.batching is not None and model.config.batching.max_batch_size == 8
    assert [o.name for o in model.config.outputs] == ["label", "probabilities"]
    assert main([*args, "--allow-unsafe-pickle"]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_models_package_skops_needs_reviewed_types(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    estimator_file = tmp_path / "forest.skops"
    sio.dump(RandomForestClassifier(n_estimators=3, random_state=0).fit(IRIS_X, IRIS_Y),
             estimator_file)  # fmt: skip
    np.save(tmp_path / "x.npy", IRIS_X)
    args = [
        "models", "package", "--estimator", str(estimator_file), "--name", "forest",
        "--version", "1", "--out", str(tmp_path / "repo"), "--sample-data",
        str(tmp_path / "x.npy"), "--features", "a,b,c,d",
    ]  # fmt: skip
    assert main(args) == 2
    assert "--trust sklearn.tree._tree.Tree" in capsys.readouterr().err
    assert main([*args, "--trust", "sklearn.tree._tree.Tree"]) == 0
    entry = scan_repository(tmp_path / "repo")[0]
    assert entry.state == "READY"
    assert entry.model is not None
    assert entry.model.config.trusted_types == ("sklearn.tree._tree.Tree",)


def test_cli_models_package_text_model_from_txt(
    tmp_path: Path, repo: ModelRepository, capsys: pytest.CaptureFixture[str]
) -> None:
    estimator_file = tmp_path / "triage.skops"
    sio.dump(repo.get("ticket-triage").estimator, estimator_file)
    texts, _ = generate_tickets(30, seed=3)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    args = [
        "models", "package", "--estimator", str(estimator_file), "--name", "triage",
        "--version", "1", "--out", str(tmp_path / "repo"), "--input-name", "text",
        "--datatype", "BYTES", "--sample-data", str(tmp_path / "texts.txt"),
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    model = ModelRepository.load(tmp_path / "repo").get("triage")
    assert model.config.input.shape == (-1,) and model.config.features is None
    assert model.config.output("label") is not None
    assert model.run(np.array([b"my parcel never arrived"], dtype=object))["label"].dtype == object


def test_package_refuses_feature_names_in_another_order_than_the_estimators(
    tmp_path: Path,
) -> None:
    estimator = LogisticRegression(max_iter=500).fit(IRIS_X, IRIS_Y)
    estimator.feature_names_in_ = np.array(["sl", "sw", "pl", "pw"], dtype=object)
    kwargs: dict[str, Any] = {
        "name": "named",
        "repo": tmp_path,
        "input_name": "input",
        "input_datatype": "FP64",
    }
    swapped = IRIS_X[:, [1, 0, 2, 3]]  # a CSV whose header puts sw first
    with pytest.raises(PackagingError, match="expected sl, sw, pl, pw") as info:
        package_model(
            estimator, version=1, features=["sw", "sl", "pl", "pw"], baseline_sample=swapped,
            **kwargs,
        )  # fmt: skip
    assert "sw, sl, pl, pw" in str(info.value)
    assert not (tmp_path / "named" / "1").exists()
    path = package_model(
        estimator, version=1, features=["sl", "sw", "pl", "pw"], baseline_sample=IRIS_X, **kwargs
    )
    assert load_version(path).config.features == ("sl", "sw", "pl", "pw")
    path = package_model(estimator, version=2, baseline_sample=IRIS_X, **kwargs)
    assert load_version(path).config.features == ("sl", "sw", "pl", "pw")


def test_package_refuses_a_datatype_that_changes_the_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.integers(20, 70, 200), rng.integers(30_000, 120_000, 200)])
    y = (x[:, 1] > 75_000).astype(int)
    estimator_file = tmp_path / "lr.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), estimator_file)
    sample = tmp_path / "train.csv"
    sample.write_text("age,income\n" + "\n".join(f"{a},{b}" for a, b in x) + "\n")
    args = [
        "models", "package", "--estimator", str(estimator_file), "--allow-unsafe-pickle",
        "--name", "loans", "--out", str(tmp_path / "repo"), "--sample-data", str(sample),
    ]  # fmt: skip
    assert main([*args, "--version", "1", "--datatype", "INT16"]) == 2
    err = capsys.readouterr().err
    assert "does not fit INT16: column 'income' holds" in err and "stores as" in err
    assert not (tmp_path / "repo" / "loans" / "1").exists()
    assert main([*args, "--version", "1", "--datatype", "INT64"]) == 0
    assert main([*args, "--version", "2", "--datatype", "FP32"]) == 0  # rounding is no loss
    halves = np.column_stack([x[:, 0] + 0.5, x[:, 1]])
    with pytest.raises(PackagingError, match=r"column 'age' holds \d+\.5 \(row 0\)"):
        package_model(
            LogisticRegression().fit(halves, y), name="loans", version=3, repo=tmp_path,
            input_name="input", input_datatype="INT32", features=["age", "income"],
            baseline_sample=halves,
        )  # fmt: skip
