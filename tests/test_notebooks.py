"""End to end: the notebooks through papermill on the embedded default model, a few steps."""
import json

import pytest

from conftest import ROOT
from ironman_nb.runner import StageFailed, run


FAKE_TOKEN = "hf_" + "FakeTokenForLeakCheck0123456789abcd"


def test_pipeline_runs_end_to_end_on_the_embedded_model(tmp_path, monkeypatch):
    """All six notebooks; a token in HF_TOKEN must end up in no file of the run or the repository."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    run_dir = tmp_path / "run"
    overrides = {"02_train_lora": {"max_steps": 2, "max_train_samples": 4, "max_eval_samples": 2,
                                   "per_device_train_batch_size": 2, "eval_steps": 0, "save_steps": 1},
                 "05_compare": {"max_prompts": 3, "max_new_tokens": 16, "max_eval_samples": 2}}
    run("quick", run_dir=str(run_dir), overrides=overrides, log_output=False)
    stages = ("01_prepare_data", "02_train_lora", "03_plot_training", "04_merge_lora", "05_compare", "06_push_to_hub")
    for name in stages:
        rendered = json.loads((run_dir / f"{name}.ipynb").read_text(encoding="utf-8"))
        errors = [o for c in rendered["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert errors == []
    report = json.loads((run_dir / "data" / "data_report.json").read_text(encoding="utf-8"))
    assert report["rows_kept"] >= 600
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "plots" / "training_curves.png").is_file()
    status = json.loads((run_dir / "status.json").read_text())
    assert [s["status"] for s in status["stages"].values()] == ["done"] * 6
    assert (run_dir / "merged" / "model.safetensors").is_file() and (run_dir / "merged" / "README.md").is_file()
    for name in ("comparison.jsonl", "comparison.md", "comparison.html", "metrics.json"):
        assert (run_dir / "compare" / name).is_file()
    leaks = [p for p in list(run_dir.rglob("*")) + [p for p in ROOT.rglob("*") if ".venv" not in p.parts]
             if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    cells = json.loads((run_dir / "01_prepare_data.ipynb").read_text(encoding="utf-8"))["cells"]
    summary = next(c for c in cells if "prepare(cfg)" in "".join(c["source"]))["outputs"]
    assert any("text/html" in o.get("data", {}) for o in summary), "the data summary renders as an HTML table"
    cells = json.loads((run_dir / "03_plot_training.ipynb").read_text(encoding="utf-8"))["cells"]
    chart = next(c for c in cells if "plot_training(cfg)" in "".join(c["source"]))["outputs"]
    assert any("image/png" in o.get("data", {}) for o in chart), "the loss chart renders inline"


def test_a_failing_notebook_stops_the_run_and_is_named(tmp_path):
    missing = tmp_path / "missing.csv"
    with pytest.raises(StageFailed, match=r"stage 01_prepare_data failed: DataError: .*missing.csv.*file not found"):
        run("quick", run_dir=str(tmp_path / "run"), overrides={"input_path": str(missing)}, log_output=False)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["stages"]["01_prepare_data"]["status"] == "failed"
    assert "02_train_lora" not in status["stages"]
