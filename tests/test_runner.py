"""The runner's checks before any kernel starts, and the notebooks' shape."""
import json
from pathlib import Path

import pytest

from conftest import ROOT
from ironman_nb.config import ConfigError
from ironman_nb.runner import STAGES, main, notebook_parameters, run, stage_params

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_stage_has_its_notebook_and_every_notebook_a_stage():
    assert [s.notebook for s in STAGES] == NOTEBOOKS


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_parameters_cell_matches_the_config(stage):
    """Same names, same defaults: the notebook and its config cannot drift apart."""
    assert notebook_parameters(stage.notebook) == stage.config.defaults()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_clean_and_thin(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][0]["source"][0].startswith("# ")
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            source = "".join(cell["source"])
            assert "def " not in source and "class " not in source, "logic belongs in ironman_nb"
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]) == 1


def test_unknown_and_mistyped_parameters_are_refused_before_any_kernel(tmp_path, monkeypatch):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a kernel was started"))
    with pytest.raises(ConfigError) as err:
        run("quick", run_dir=str(tmp_path / "run"), overrides={"learnig_rate": 1e-4, "02_train_lora": {"lora_r": "8"}})
    text = str(err.value)
    assert "unknown parameter 'learnig_rate'" in text
    assert "02_train_lora: TrainConfig.lora_r: must be an integer" in text
    assert not (tmp_path / "run").exists()


def test_cli_reports_refused_parameters_with_exit_code_2(tmp_path, capsys):
    code = main(["run", "--run-dir", str(tmp_path / "r"), "-p", "base_model", "1234", "-p", "repo_id", "1234"])
    assert code == 2
    err = capsys.readouterr().err
    assert "base_model: must be a string (got int 1234)" in err
    assert "06_push_to_hub: PushConfig.repo_id: must be a string (got int 1234)" in err
    assert not (tmp_path / "r").exists()


def test_the_flag_the_refusal_names_keeps_a_number_like_value_a_string(tmp_path, monkeypatch, capsys):
    """An XLSX sheet named 2024: `-p sheet 2024` is refused as a number and the refusal says "pass it with
    -r sheet 2024"; the runner takes that flag and the value arrives as text."""
    import papermill

    assert main(["run", "--run-dir", str(tmp_path / "r"), "-p", "sheet", "2024"]) == 2
    assert "pass it with -r sheet 2024" in capsys.readouterr().err
    received = {}
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda notebook, output, parameters, **k: received.update({Path(notebook).stem: parameters}))
    assert main(["run", "--run-dir", str(tmp_path / "r"), "-r", "sheet", "2024"]) == 0
    assert received["01_prepare_data"]["sheet"] == "2024"


def test_out_of_range_values_in_a_params_file_are_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("02_train_lora:\n  lora_dropout: 2.0\n")
    with pytest.raises(ConfigError, match="lora_dropout: must be in"):
        run("quick", params_file=str(params), run_dir=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="--profile 'fast'"):
        run("fast", run_dir=str(tmp_path / "r"))


def test_unquoted_on_off_in_yaml_mean_the_words(tmp_path):
    """PyYAML reads `padding_free: off` (and `-p padding_free off`) as False; the on/off fields take it as "off"."""
    import yaml

    params = yaml.safe_load("02_train_lora:\n  padding_free: off\n  gradient_checkpointing: on\n  token_metrics: on\n"
                            "  merge_micro_batches: off\n")
    per_stage, problems = stage_params([params], tmp_path, tmp_path)
    assert problems == []
    train = per_stage["02_train_lora"]
    assert (train["padding_free"], train["gradient_checkpointing"], train["token_metrics"]) == ("off", "on", True)
    assert train["merge_micro_batches"] == "off"  # a field whose words are auto/off only
    _, problems = stage_params([{"02_train_lora": {"lora_target": False}}], tmp_path, tmp_path)
    assert any("lora_target: must be a string" in p for p in problems)  # only the on/off fields


def test_a_later_layer_beats_an_earlier_ones_section(tmp_path):
    """`-p learning_rate 1e-3` with the quick profile, whose 02_train_lora section sets its own learning rate:
    the command line wins (the profile's section won, silently, and a bad value there went unchecked)."""
    from ironman_nb.runner import profile_params

    profile = profile_params("quick")
    assert "learning_rate" in profile["02_train_lora"] and "max_new_tokens" in profile["05_compare"]
    file_layer = {"max_new_tokens": 7, "02_train_lora": {"seed": 5}}
    per_stage, problems = stage_params([profile, file_layer, {"learning_rate": 0.001, "seed": 9}], tmp_path, tmp_path)
    assert problems == []
    assert per_stage["02_train_lora"]["learning_rate"] == 0.001 and per_stage["02_train_lora"]["seed"] == 9
    assert per_stage["05_compare"]["max_new_tokens"] == 7
    assert per_stage["02_train_lora"]["num_train_epochs"] == profile["02_train_lora"]["num_train_epochs"]
    # Within one layer the stage's own section is the more specific: it wins over the layer's shared name.
    per_stage, _ = stage_params([{"seed": 1, "02_train_lora": {"seed": 2}}], tmp_path, tmp_path)
    assert (per_stage["01_prepare_data"]["seed"], per_stage["02_train_lora"]["seed"]) == (1, 2)
    _, problems = stage_params([profile, {"num_train_epochs": "abc"}], tmp_path, tmp_path)
    assert any("num_train_epochs: must be a number" in p for p in problems)


def test_links_are_not_taken_for_paths(tmp_path):
    for link in ("docs.google.com/spreadsheets/d/abc123/edit#gid=5", "https://docs.google.com/spreadsheets/d/abc123"):
        per_stage, problems = stage_params([{"input_path": link}], tmp_path, tmp_path)
        assert problems == [] and per_stage["01_prepare_data"]["input_path"] == link


def test_stages_are_wired_through_the_run_folder(tmp_path):
    per_stage, problems = stage_params([{"seed": 3, "input_path": "my.csv"}], tmp_path, tmp_path)
    assert problems == []
    assert per_stage["01_prepare_data"]["input_path"] == str(tmp_path / "my.csv")
    assert per_stage["01_prepare_data"]["seed"] == 3 and per_stage["02_train_lora"]["seed"] == 3
    assert per_stage["02_train_lora"]["data_dir"] == per_stage["01_prepare_data"]["output_dir"]
    assert per_stage["03_plot_training"]["trainer_state"] == str(tmp_path / "adapter" / "trainer_state.json")


def test_a_checkpoint_to_resume_from_is_taken_from_where_the_runner_started(tmp_path):
    """`-p resume runs/x/adapter/checkpoints/checkpoint-100`, not resolved against notebooks/ in the kernel."""
    checkpoint = "runs/x/adapter/checkpoints/checkpoint-100"
    per_stage, problems = stage_params([{"resume": checkpoint}], tmp_path / "run", tmp_path)
    assert problems == [] and per_stage["02_train_lora"]["resume"] == str(tmp_path / checkpoint)
    for word in ("auto", "never"):
        per_stage, problems = stage_params([{"resume": word}], tmp_path / "run", tmp_path)
        assert problems == [] and per_stage["02_train_lora"]["resume"] == word


def test_a_second_machine_trains_and_leaves_the_later_stages_to_machine_zero(tmp_path, monkeypatch, capsys):
    """The README's two-machine run: the same command on both machines, machine_rank 0 and 1. Machine 1 prepares
    its data and joins the training; plotting, merging, comparing and uploading happen on machine 0, which holds
    the adapter."""
    import papermill

    executed = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda notebook, output, **k: executed.append(Path(notebook).stem))
    cluster = {"launcher": "deepspeed", "num_processes": 8, "num_machines": 2, "main_process_ip": "10.0.0.1"}
    run("quick", run_dir=str(tmp_path / "m1"), overrides={**cluster, "machine_rank": 1})
    assert executed == ["01_prepare_data", "02_train_lora"]
    stages = json.loads((tmp_path / "m1" / "status.json").read_text(encoding="utf-8"))["stages"]
    assert [stages[name]["status"] for name in sorted(stages)] == ["done", "done"] + ["skipped"] * 4
    assert "machine_rank 1" in stages["04_merge_lora"]["reason"]
    assert "04_merge_lora skipped: this machine (machine_rank 1) took part in the training" in capsys.readouterr().out
    executed.clear()
    run("quick", run_dir=str(tmp_path / "m0"), overrides={**cluster, "machine_rank": 0})
    assert executed == [stage.name for stage in STAGES]


def test_numbers_written_1e_4_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` as a string, so `-p learning_rate 1e-4` was refused as not a number."""
    from ironman_nb.config import read_yaml

    assert [read_yaml(t) for t in ("1e-4", "-2E+3", ".5e1", "1.0e-4", "e5", "1e", '"1e-4"')] == [
        1e-4, -2000.0, 5.0, 1e-4, "e5", "1e", "1e-4"]
    params = tmp_path / "params.yaml"
    params.write_text("02_train_lora:\n  learning_rate: 2e-4\n", encoding="utf-8-sig")  # saved with a BOM too
    from ironman_nb.runner import load_params_file

    layer = load_params_file(str(params))
    per_stage, problems = stage_params([layer, {"lora_dropout": read_yaml("1e-2")}], tmp_path, tmp_path)
    assert problems == [] and per_stage["02_train_lora"]["learning_rate"] == 2e-4
    assert per_stage["02_train_lora"]["lora_dropout"] == 0.01


def test_papermill_reads_every_parameter_of_every_notebook():
    """A quote in a parameter's comment made papermill skip that line (a warning on every run, and the
    parameter missing from `papermill --help-notebook`)."""
    from papermill.translators import PythonTranslator

    for stage in STAGES:
        nb = json.loads(stage.notebook.read_text(encoding="utf-8"))
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        source = "".join(cell["source"])
        read = [p.name for p in PythonTranslator.inspect({"source": source})]
        assert read == list(notebook_parameters(stage.notebook)), stage.name


def test_the_accelerate_config_is_not_offered_as_a_profile(tmp_path):
    with pytest.raises(ConfigError) as caught:
        run("accelerate_fsdp", run_dir=str(tmp_path / "r"))
    assert "(profiles: full, gpu24gb, quick)" in str(caught.value)
