"""The `loraswap` command on the tiny base: train, adapters list/validate, eval, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from loraswap.main import main


@pytest.fixture(scope="module")
def store(tiny_base: Path, qa_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-store")
    main(
        [
            "train",
            "--qtype",
            "symptoms",
            "--qtype",
            "treatment",
            "--data",
            str(qa_csv),
            "--out",
            str(out),
            "--base",
            str(tiny_base),
            "--max-steps",
            "6",
            "--lr",
            "5e-3",
            "--no-quant",
            "--eval-examples",
            "2",
        ]
    )
    return out


def test_every_command_explains_its_options() -> None:
    for cmd in (
        ["--help"],
        ["train", "--help"],
        ["eval", "--help"],
        ["adapters", "list", "--help"],
        ["adapters", "validate", "--help"],
        ["train-bench", "--help"],
    ):
        r = subprocess.run([sys.executable, "-m", "loraswap.main", *cmd], capture_output=True, text=True, check=True)
        assert "Usage" in r.stdout
    r = subprocess.run([sys.executable, "-m", "loraswap.main", "train", "--help"], capture_output=True, text=True)
    for opt in (
        "--qtype",
        "--all-qtypes",
        "--max-steps",
        "--epochs",
        "--max-examples",
        "--max-seq-len",
        "--lr",
        "--seed",
        "--grad-accum",
        "--rank",
        "--alpha",
        "--method",
        "--quant",
        "--double-quant",
    ):
        assert opt in r.stdout, opt


def test_train_writes_adapters_listed_by_the_store(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["adapters", "list", "--json", "--adapters-dir", str(store)], capsys)
    assert code == 0
    listed = {d["name"]: d for d in json.loads(out)}
    for name in ("symptoms", "treatment"):
        d = listed[name]
        assert d["qtype"] == name and d["method"] == "lora" and d["rank"] == 8 and d["source"] == "user"
        assert d["size_bytes"] > 0


def test_validate_reports_problems_with_exit_status(
    store: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["adapters", "validate", str(store / "symptoms"), "--base", str(tiny_base)], capsys)
    assert code == 0 and "ok" in out
    code, out, _ = run_cli(
        ["adapters", "validate", str(store / "symptoms"), "--base", str(tiny_base), "--max-rank", "4"], capsys
    )
    assert code == 1 and "rank r=8 is outside 1..4" in out


def test_eval_json_and_matrix(
    store: Path, tiny_base: Path, qa_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--data", str(qa_csv), "--adapters-dir", str(store), "--base", str(tiny_base), "--no-quant"]
    code, out, _ = run_cli(
        ["eval", "--qtype", "symptoms", "--limit", "3", "--json", "--max-new-tokens", "4", *common], capsys
    )
    assert code == 0
    obj = json.loads(out)
    assert obj["qtype"] == "symptoms" and obj["n"] >= 1
    assert set(obj["results"]) >= {"__base__", "symptoms"}
    assert set(obj["results"]["__base__"]) == {"nll", "rougeL"}
    mine = obj["results"]["symptoms"]
    assert set(mine) == {"nll", "rougeL", "nll_change", "nll_change_ci95"}
    base_nll = obj["results"]["__base__"]["nll"]
    assert mine["nll_change"] == pytest.approx((mine["nll"] - base_nll) / base_nll, abs=2e-4)
    assert mine["nll_change_ci95"][0] <= mine["nll_change"] <= mine["nll_change_ci95"][1]
    code, out, _ = run_cli(["eval", "--matrix", "--limit", "3", "--out", str(tmp_path), *common], capsys)
    assert code == 0
    report = json.loads((tmp_path / "matrix.json").read_text())
    matrix = report["nll"]
    assert set(matrix) == {"symptoms", "treatment"}
    assert set(matrix["symptoms"]) == {"__base__", "symptoms", "treatment"}
    for q in ("symptoms", "treatment"):  # is the qtype's own adapter the lowest of its column?
        assert report["own_best"][q] == (matrix[q][q] <= min(matrix[q].values()))
    assert (tmp_path / "matrix.png").stat().st_size > 1000


def test_eval_record_writes_the_figures_into_the_manifest(
    store: Path, tiny_base: Path, qa_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from loraswap.adapters.manifest import read_manifest

    mine = shutil.copytree(store, tmp_path / "store")
    args = ["eval", "--qtype", "symptoms", "--adapter", "symptoms", "--limit", "3", "--metrics", "nll", "--json"]
    common = ["--data", str(qa_csv), "--adapters-dir", str(mine), "--base", str(tiny_base), "--no-quant"]
    code, out, _ = run_cli([*args, "--record", *common], capsys)
    assert code == 0
    said = json.loads(out)["results"]
    figures = read_manifest(mine / "symptoms").metrics
    assert figures["nll"] == said["symptoms"]["nll"] and figures["base_nll"] == said["__base__"]["nll"]
    assert figures["nll_change"] == said["symptoms"]["nll_change"] and figures["heldout_n"] == json.loads(out)["n"]
    assert figures["nll_change_ci95"] == said["symptoms"]["nll_change_ci95"] and figures["quant"] == "none"
    assert read_manifest(mine / "treatment").metrics == read_manifest(store / "treatment").metrics  # untouched
    code, _, err = run_cli([*args, "--record", "--matrix", *common], capsys)
    assert code == 2 and "--record" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--qtype", "symptom"], "unknown qtype(s) ['symptom']"),
        (["train"], "give --qtype"),
        (["train", "--qtype", "symptoms", "--method", "ia3"], "--method 'ia3'"),
        (["train", "--qtype", "symptoms", "--other-rows", "-1"], "other_rows must be 0 or more"),
        (["eval", "--qtype", "symptoms", "--metrics", "bleu"], "choose from nll, rougeL"),
        (["eval", "--qtype", "symptoms", "--adapter", "symtoms"], "did you mean 'symptoms'"),
    ],
)
def test_errors_are_one_clear_line(
    args: list[str], message: str, store: Path, qa_csv: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        [*args, "--data", str(qa_csv), "--base", str(tiny_base)]
        + (["--adapters-dir", str(store)] if args[0] == "eval" else []),
        capsys,
    )
    assert code == 2
    assert message in err and "Traceback" not in err


def test_bad_base_is_a_clear_error(qa_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["train", "--qtype", "symptoms", "--data", str(qa_csv), "--base", str(tmp_path / "nothing")], capsys
    )
    assert code == 2 and "is not 'embedded', an existing model folder" in err
    empty = tmp_path / "model"
    empty.mkdir()
    code, _, err = run_cli(["train", "--qtype", "symptoms", "--data", str(qa_csv), "--base", str(empty)], capsys)
    assert code == 2 and "has no config.json" in err


def test_install_and_remove_an_archive(
    store: Path, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tarfile

    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in ("adapter_config.json", "adapter_model.safetensors", "loraswap.json"):
            tar.add(store / "symptoms" / f, arcname=f"symptoms/{f}")
    user = tmp_path / "user"
    common = ["--adapters-dir", str(user), "--base", str(tiny_base)]
    code, _, _ = run_cli(["adapters", "install", str(archive), "--name", "uploaded", *common], capsys)
    assert code == 0 and (user / "uploaded" / "adapter_model.safetensors").is_file()
    code, _, err = run_cli(["adapters", "install", str(archive), "--name", "uploaded", *common], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err
    code, _, _ = run_cli(["adapters", "remove", "uploaded", "--adapters-dir", str(user)], capsys)
    assert code == 0 and not (user / "uploaded").exists()
    code, _, err = run_cli(["adapters", "remove", "uploaded", "--adapters-dir", str(user)], capsys)
    assert code == 2 and "not found" in err
