"""Interrupted and failing runs, stage skipping, and secrets."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, write_chat_data
from ironman_nb.config import MergeConfig, TrainConfig

TOKEN_SHAPE = re.compile(rb"hf_[A-Za-z0-9]{30,}")


def tiny_train_params(tmp_path, model_dir, **overrides):
    data = write_chat_data(tmp_path / "data", train_rows=16)
    params = dict(base_model=str(model_dir), data_dir=str(data), output_dir=str(tmp_path / "adapter"), max_steps=40,
                  per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3, logging_steps=1,
                  save_steps=100, eval_steps=0, max_length=512, seed=11)
    params.update(overrides)
    return params


def sigterm_at(command: list[str], marker: str, timeout: int) -> tuple[int, str]:
    """Run `command`, send it SIGTERM once a line holds `marker`, and return its exit code and whole output."""
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            process.send_signal(signal.SIGTERM)
            break
    try:
        rest, _ = process.communicate(timeout=timeout)
    finally:
        process.kill()  # only if it hangs: a no-op once it has ended
    return process.returncode, "".join(lines) + rest


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from ironman_nb.train import train

    reference = train(TrainConfig(**tiny_train_params(tmp_path / "reference", tiny_model_dir)))

    params = tiny_train_params(tmp_path / "killed", tiny_model_dir)
    config = tmp_path / "run_config.json"
    config.write_text(json.dumps(params))
    code, output = sigterm_at([sys.executable, "-m", "ironman_nb.train", "--config", str(config)], "[train] step 3/40",
                              timeout=300)
    assert code == 128 + signal.SIGTERM, output
    checkpoints = sorted((tmp_path / "killed" / "adapter" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1, output
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped_at < 40
    assert not (tmp_path / "killed" / "adapter" / "adapter_model.safetensors").exists()  # no final adapter yet

    resumed = train(TrainConfig(**params))
    assert resumed.run_config["resolved"]["resumed_from"] == str(checkpoints[0])
    last = lambda r: [h for h in r.log_history if "loss" in h][-1]
    assert last(resumed)["step"] == last(reference)["step"] == 40
    assert last(resumed)["loss"] == pytest.approx(last(reference)["loss"], rel=1e-5)


def test_non_finite_loss_fails_the_run_and_merge_refuses_it(tmp_path, tiny_model_dir):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from ironman_nb.merge import MergeError, merge
    from ironman_nb.train import NonFiniteTrainingError, train

    broken_model = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken_model)
    weights = load_file(str(broken_model / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("inf"))
    save_file(weights, str(broken_model / "model.safetensors"), metadata={"format": "pt"})
    params = tiny_train_params(tmp_path, broken_model, max_steps=4, save_steps=1)
    with pytest.raises(NonFiniteTrainingError, match="non-finite value"):
        train(TrainConfig(**params))
    adapter = tmp_path / "adapter"
    run_config = json.loads((adapter / "run_config.json").read_text())
    assert run_config["failed"] is True and run_config["result"]["global_step"] == 1
    assert not (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "checkpoints").exists() or not any((adapter / "checkpoints").glob("checkpoint-*"))
    with pytest.raises(MergeError, match="marks the training as failed"):
        merge(MergeConfig(base_model=str(broken_model), adapter_dir=str(adapter), output_dir=str(tmp_path / "merged")))


def fake_notebooks(monkeypatch, raises=None):
    """papermill.execute_notebook replaced by a stand-in: each stage writes one file into its output folder (06 only
    its model card into the merged folder, which is no input of any stage), or `raises[stage]()` is raised.
    Returns the list of notebooks run."""
    import papermill

    calls = []

    def fake_execute(notebook, output, parameters, **kwargs):
        calls.append(os.path.basename(notebook))
        stage = os.path.basename(notebook)[:-6]
        if stage in (raises or {}):
            raise raises[stage]()
        out = parameters.get("output_dir") or parameters.get("model_dir")
        os.makedirs(out, exist_ok=True)
        name = ("README.md" if "model_dir" in parameters else "trainer_state.json" if stage == "02_train_lora"
                else "training_curves.png" if stage == "03_plot_training" else f"{stage}.out")
        with open(os.path.join(out, name), "w") as handle:
            handle.write(str(time.time_ns()))
        with open(output, "w") as handle:
            handle.write("{}")

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    return calls


def write_sheet(path, rows=1):
    rows = "".join(f"질문 {i},,답 {i}\n" for i in range(rows))
    path.write_text("instruction,input,output\n" + rows, encoding="utf-8")
    return path


def test_runner_skips_stages_done_with_unchanged_inputs(tmp_path, monkeypatch):
    from ironman_nb import runner

    calls = fake_notebooks(monkeypatch)
    sheet = write_sheet(tmp_path / "sheet.csv")
    run_dir = tmp_path / "run"
    runner.run("quick", run_dir=str(run_dir), overrides={"input_path": str(sheet)}, log_output=False)
    assert len(calls) == 6
    stages = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))["stages"]
    assert stages["06_push_to_hub"]["params"]["dry_run"] is True  # defaults too: was anything uploaded?
    calls.clear()
    runner.run("quick", run_dir=str(run_dir), overrides={"input_path": str(sheet)}, log_output=False)
    assert calls == []
    # A changed training parameter re-runs training and everything that reads its outputs.
    runner.run("quick", run_dir=str(run_dir), overrides={"input_path": str(sheet), "02_train_lora": {"lora_r": 4}},
               log_output=False)
    assert calls == ["02_train_lora.ipynb", "03_plot_training.ipynb", "04_merge_lora.ipynb", "05_compare.ipynb",
                     "06_push_to_hub.ipynb"]
    calls.clear()
    time.sleep(0.01)
    sheet.write_text("instruction,input,output\nq,,changed answer\n")
    runner.run("quick", run_dir=str(run_dir), overrides={"input_path": str(sheet), "02_train_lora": {"lora_r": 4}},
               log_output=False)
    assert calls[0] == "01_prepare_data.ipynb" and len(calls) == 6
    calls.clear()
    # A new comparison changes the model card, which quotes it: 06 runs again, though its model folder did not change.
    runner.run("quick", run_dir=str(run_dir), overrides={"input_path": str(sheet), "02_train_lora": {"lora_r": 4},
                                                          "05_compare": {"max_prompts": 3}}, log_output=False)
    assert calls == ["05_compare.ipynb", "06_push_to_hub.ipynb"]
    calls.clear()
    runner.run("quick", run_dir=str(run_dir), overrides={"input_path": str(sheet), "02_train_lora": {"lora_r": 4},
                                                          "05_compare": {"max_prompts": 3}}, log_output=False, force=True)
    assert len(calls) == 6


def test_a_stage_whose_output_was_deleted_runs_again(tmp_path, monkeypatch):
    """`rm -rf run/merged` to free disk (the disk-full advice says so): the next run merges again instead of
    skipping 04 and failing in 05; an emptied folder counts as deleted."""
    import shutil

    from ironman_nb import runner

    calls = fake_notebooks(monkeypatch)
    overrides = {"input_path": str(write_sheet(tmp_path / "sheet.csv"))}
    run_dir = tmp_path / "run"
    runner.run("quick", run_dir=str(run_dir), overrides=overrides, log_output=False)
    shutil.rmtree(run_dir / "merged")
    calls.clear()
    runner.run("quick", run_dir=str(run_dir), overrides=overrides, log_output=False)
    assert calls == ["04_merge_lora.ipynb", "05_compare.ipynb", "06_push_to_hub.ipynb"]
    for chart in (run_dir / "plots").iterdir():
        chart.unlink()
    calls.clear()
    runner.run("quick", run_dir=str(run_dir), overrides=overrides, log_output=False)
    assert calls == ["03_plot_training.ipynb", "06_push_to_hub.ipynb"]  # the card shows the charts
    calls.clear()
    runner.run("quick", run_dir=str(run_dir), overrides={**overrides, "smoothing": 0.3}, log_output=False)
    assert calls == ["03_plot_training.ipynb", "06_push_to_hub.ipynb"]  # new charts: the card gets them


def test_a_dead_kernel_or_ctrl_c_is_recorded_in_the_status(tmp_path, monkeypatch, capsys):
    """The OOM killer ends the kernel (nbclient's DeadKernelError), or Ctrl-C stops the runner: status.json says
    so instead of staying "running"."""
    from nbclient.exceptions import DeadKernelError

    from ironman_nb.runner import StageFailed, main, run

    fake_notebooks(monkeypatch, raises={"02_train_lora": lambda: DeadKernelError("Kernel died")})
    overrides = {"input_path": str(write_sheet(tmp_path / "sheet.csv"))}
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed, match="stage 02_train_lora failed: the notebook's kernel died") as failed:
        run("quick", run_dir=str(run_dir), overrides=overrides, log_output=False)
    assert failed.value.exit_code == 1
    entry = json.loads((run_dir / "status.json").read_text())["stages"]["02_train_lora"]
    assert entry["status"] == "failed"
    assert "ran out of memory" in entry["error"] and str(run_dir / "02_train_lora.ipynb") in entry["error"]

    fake_notebooks(monkeypatch, raises={"02_train_lora": KeyboardInterrupt})
    assert main(["run", "--run-dir", str(run_dir), "-p", "input_path", overrides["input_path"]]) == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    entry = json.loads((run_dir / "status.json").read_text())["stages"]["02_train_lora"]
    assert entry["status"] == "interrupted" and entry["error"] == "interrupted (Ctrl-C)"


def test_sigterm_to_the_runner_reaches_the_kernel_which_saves_a_checkpoint(tmp_path, tiny_model_dir):
    """`kill <runner>` (a pod being stopped): jupyter_client starts the kernel in a session of its own, so only the
    runner gets the signal. It passes it on and waits while training saves a checkpoint, then records the stage."""
    run_dir = tmp_path / "run"
    sheet = write_sheet(tmp_path / "sheet.csv", rows=20)
    command = [sys.executable, "-m", "ironman_nb", "run", "--run-dir", str(run_dir), "-p", "input_path", str(sheet),
               "-p", "base_model", str(tiny_model_dir),
               "-p", "02_train_lora", "{max_steps: 500, save_steps: 1000, eval_steps: 0, per_device_train_batch_size: 2}"]
    code, output = sigterm_at(command, "[train] step 3/500", timeout=120)
    assert code == 128 + signal.SIGTERM, output
    checkpoints = sorted((run_dir / "adapter" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1, output
    stages = json.loads((run_dir / "status.json").read_text())["stages"]
    assert stages["02_train_lora"]["status"] == "interrupted" and "03_plot_training" not in stages
    error = stages["02_train_lora"]["error"]
    assert error.startswith("SIGTERM received") and "TrainingInterrupted" in error


@pytest.fixture
def signals_must_not_reach_pytest():
    """SIGTERM and SIGHUP fail the test instead of ending pytest, where the runner leaves them unhandled."""
    def unhandled(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the test: the runner did not handle it")

    previous = {signum: signal.signal(signum, unhandled) for signum in (signal.SIGTERM, signal.SIGHUP)}
    yield unhandled
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_a_closed_terminal_is_passed_on_and_a_second_signal_stops_waiting(tmp_path, monkeypatch,
                                                                       signals_must_not_reach_pytest):
    """SIGHUP (the terminal closed) reaches a stand-in kernel, a child process that, like training, goes on after
    SIGTERM; a second signal stops waiting for it. The run exits with 128 + SIGHUP."""
    import papermill

    from ironman_nb.runner import StageFailed, run

    stand_in = "import signal, time\nsignal.signal(signal.SIGTERM, lambda s, f: print('got', s, flush=True))\n" \
               "print('ready', flush=True)\ntime.sleep(60)"
    kernel = {}

    def fake_execute(notebook, output, parameters, **kwargs):
        with subprocess.Popen([sys.executable, "-c", stand_in], stdout=subprocess.PIPE, text=True) as child:
            try:
                assert child.stdout.readline() == "ready\n"
                os.kill(os.getpid(), signal.SIGHUP)
                kernel["got"] = child.stdout.readline()
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # not reached: the second signal stops waiting
            finally:
                child.kill()

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed, match="stage 01_prepare_data interrupted: SIGHUP received") as stopped:
        run("quick", run_dir=str(run_dir), log_output=False)
    assert kernel["got"] == f"got {int(signal.SIGTERM)}\n"
    assert stopped.value.exit_code == 128 + signal.SIGHUP
    entry = json.loads((run_dir / "status.json").read_text())["stages"]["01_prepare_data"]
    assert entry["status"] == "interrupted" and "second SIGTERM: stopped waiting for the kernel" in entry["error"]
    assert signal.getsignal(signal.SIGTERM) is signals_must_not_reach_pytest  # handlers restored after the stage


def test_sighup_ignored_under_nohup_stays_ignored(tmp_path, monkeypatch, signals_must_not_reach_pytest):
    """`nohup … &` makes the runner ignore SIGHUP so that a closed terminal does not stop it; that stays so."""
    import papermill

    from ironman_nb.runner import run

    def fake_execute(notebook, output, parameters, **kwargs):
        os.kill(os.getpid(), signal.SIGHUP)
        executed.append(os.path.basename(notebook))

    executed = []
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
    run("quick", run_dir=str(tmp_path / "run"), log_output=False)
    assert len(executed) == 6


def _tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def test_no_token_shaped_string_is_committed():
    offenders = [str(p.relative_to(ROOT)) for p in _tracked_files() if p.is_file() and TOKEN_SHAPE.search(p.read_bytes())]
    assert offenders == []


def test_committed_notebooks_carry_no_outputs():
    for path in _tracked_files():
        if path.suffix == ".ipynb":
            nb = json.loads(path.read_text(encoding="utf-8"))
            assert all(not c.get("outputs") and not c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"), path


def test_from_and_until_run_a_part_of_the_pipeline(tmp_path, monkeypatch):
    """Check a new sheet without training (`--until 01`); re-run one stage (`--from 05`) though nothing changed."""
    from ironman_nb import runner
    from ironman_nb.config import ConfigError

    calls = fake_notebooks(monkeypatch)
    overrides = {"input_path": str(write_sheet(tmp_path / "sheet.csv"))}
    run_dir = tmp_path / "run"
    runner.run("quick", run_dir=str(run_dir), overrides=overrides, log_output=False, until_stage="01")
    assert calls == ["01_prepare_data.ipynb"]
    calls.clear()
    runner.run("quick", run_dir=str(run_dir), overrides=overrides, log_output=False)
    assert calls == ["02_train_lora.ipynb", "03_plot_training.ipynb", "04_merge_lora.ipynb", "05_compare.ipynb",
                     "06_push_to_hub.ipynb"]  # 01 was done: skipped
    calls.clear()
    runner.run("quick", run_dir=str(run_dir), overrides=overrides, log_output=False, from_stage="compare")
    assert calls == ["05_compare.ipynb", "06_push_to_hub.ipynb"]  # 06 because 05's output changed
    with pytest.raises(ConfigError, match=r"--from '05_compar': no such stage \(did you mean 05_compare\?\)"):
        runner.run("quick", run_dir=str(run_dir), from_stage="05_compar")
    with pytest.raises(ConfigError, match="comes after --until"):
        runner.run("quick", run_dir=str(run_dir), from_stage="04", until_stage="02")
    with pytest.raises(ConfigError, match=r"unknown parameter '02_train': no notebook has it \(did you mean '02_train_lora'\?"):
        runner.run("quick", run_dir=str(run_dir), overrides={"02_train": {"seed": 1}})
