"""Beyond one process: launcher command lines, DeepSpeed configs, and a real 2-process accelerate run on CPU."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, write_chat_data
from ironman_nb.config import ConfigError, MergeConfig, TrainConfig
from ironman_nb.launch import launch_command


def test_accelerate_command_line():
    cfg = TrainConfig(launcher="accelerate", num_processes=2)
    command = launch_command(cfg, Path("/run/launch_config.json"), "bf16")
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    text = " ".join(command)
    assert "--num_processes 2 --num_machines 1 --machine_rank 0 --main_process_port 29500 --mixed_precision bf16" in text
    assert "--multi_gpu" in command and "--main_process_ip" not in command
    assert command[-4:] == ["-m", "ironman_nb.train", "--config", "/run/launch_config.json"]
    two = launch_command(TrainConfig(launcher="accelerate", num_processes=8, num_machines=2, machine_rank=1,
                                     main_process_ip="10.0.0.1", accelerate_config="configs/accelerate_fsdp.yaml"),
                         Path("c.json"), "bf16")
    text = " ".join(two)
    assert "--num_processes 16 --num_machines 2 --machine_rank 1" in text and "--main_process_ip 10.0.0.1" in text
    assert "--config_file " + str((Path("configs/accelerate_fsdp.yaml")).resolve()) in text and "--multi_gpu" not in two


def test_deepspeed_command_line(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    command = launch_command(TrainConfig(launcher="deepspeed", num_processes=2), Path("c.json"), "bf16")
    assert command[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert " ".join(command[3:]) == "--num_gpus 2 --master_port 29500 --module ironman_nb.train --config c.json"
    # The runner drops CUDA_VISIBLE_DEVICES when given --num_gpus: the GPUs the user chose are named instead.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    command = launch_command(TrainConfig(launcher="deepspeed", num_processes=2), Path("c.json"), "bf16")
    assert " ".join(command[3:7]) == "--include localhost:2,3 --master_port 29500"
    with pytest.raises(ConfigError, match="4 processes, but CUDA_VISIBLE_DEVICES shows 3 GPU"):
        launch_command(TrainConfig(launcher="deepspeed", num_processes=4), Path("c.json"), "bf16")


def test_a_second_machines_deepspeed_command_passes_deepspeeds_own_runner(tmp_path, monkeypatch):
    """Without a hostfile the runner refuses --num_nodes 2 ('no extra nodes available via hostfile'): the command
    of machine_rank 1 is run for real, with a stand-in module that prints the rank the launcher gave it."""
    import subprocess

    from ironman_nb.launch import write_deepspeed_hostfile

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = TrainConfig(launcher="deepspeed", num_processes=1, num_machines=2, machine_rank=1,
                      main_process_ip="127.0.0.1", main_process_port=29641)
    config_path = tmp_path / "launch_config.json"
    write_deepspeed_hostfile(cfg, config_path)
    command = launch_command(cfg, config_path, "fp32")
    assert "--hostfile " + str(tmp_path / "deepspeed_hostfile") + " --no_ssh --num_nodes 2 --node_rank 1" in " ".join(command)
    (tmp_path / "rank_probe.py").write_text("import os; print('RANK', os.environ['RANK'], os.environ['WORLD_SIZE'])")
    command = command[:command.index("--module") + 1] + ["rank_probe"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0 and "RANK 1 2" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_launcher_parameters_are_checked():
    with pytest.raises(ConfigError, match="main_process_ip: is required with num_machines > 1"):
        TrainConfig(launcher="deepspeed", num_machines=2)
    with pytest.raises(ConfigError, match=r"machine_rank: must be in \[0, num_machines\)"):
        TrainConfig(launcher="accelerate", num_machines=2, machine_rank=2, main_process_ip="h")
    with pytest.raises(ConfigError, match="need launcher 'accelerate' or 'deepspeed'"):
        TrainConfig(num_processes=2)
    with pytest.raises(ConfigError, match="launcher: must be one of"):
        TrainConfig(launcher="torchrun")


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json"])
def test_deepspeed_configs_pass_deepspeeds_own_parser(name):
    """HF fills the "auto" values from the training arguments; DeepSpeed's parser then validates the result."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    path = ROOT / "configs" / name
    hf = HfTrainerDeepSpeedConfig(str(path))
    hf.trainer_config_process(TrainingArguments(output_dir="/tmp/ds", per_device_train_batch_size=4,
                                                gradient_accumulation_steps=4, bf16=True, use_cpu=True))
    hf.trainer_config_finalize(TrainingArguments(output_dir="/tmp/ds", per_device_train_batch_size=4,
                                                 gradient_accumulation_steps=4, bf16=True, use_cpu=True),
                               model=SimpleNamespace(config=SimpleNamespace(hidden_size=3584)), num_training_steps=10)
    parsed = DeepSpeedConfig(hf.config)
    assert parsed.zero_optimization_stage == int(name[7])
    assert parsed.train_micro_batch_size_per_gpu == 4 and parsed.gradient_accumulation_steps == 4
    assert parsed.bfloat16_config.enabled
    if name == "ds_zero3.json":
        assert parsed.zero_config.gather_16bit_weights_on_model_save is True  # the adapter is saved whole


def test_two_process_accelerate_run_saves_one_adapter_that_merges(tmp_path, tiny_model_dir):
    from ironman_nb.merge import merge
    from ironman_nb.train import train

    data = write_chat_data(tmp_path / "data", train_rows=16)
    cfg = TrainConfig(base_model=str(tiny_model_dir), data_dir=str(data), output_dir=str(tmp_path / "adapter"),
                      max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=5e-3,
                      logging_steps=1, save_steps=100, eval_steps=0, max_length=512,
                      launcher="accelerate", num_processes=2, main_process_port=29631)
    result = train(cfg)
    out = tmp_path / "adapter"
    assert (out / "adapter_model.safetensors").is_file() and (out / "launch_config.json").is_file()
    assert result.run_config["result"]["global_step"] == 3
    assert result.run_config["resolved"]["shared_prefix"] is False  # two forwards per backward are not for DDP
    assert not (out / ".final.tmp").exists()
    merged = merge(MergeConfig(base_model=str(tiny_model_dir), adapter_dir=str(out), output_dir=str(tmp_path / "merged")))
    assert "≤" in merged.checks["max |Δ logit| merged vs base+adapter"]


def test_an_interrupted_launch_stops_every_process_at_one_checkpoint(tmp_path, tiny_model_dir):
    """SIGTERM to the notebook's kernel (a pod stopping, JupyterLab's Interrupt is SIGINT) while two processes
    train: the launcher gets it, every process saves at the same step and stops; nothing keeps running."""
    import os
    import signal

    from ironman_nb.launch import run_launched
    from ironman_nb.train import TrainingInterrupted

    data = write_chat_data(tmp_path / "data", train_rows=16)
    cfg = TrainConfig(base_model=str(tiny_model_dir), data_dir=str(data), output_dir=str(tmp_path / "adapter"),
                      max_steps=200, per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-3,
                      logging_steps=1, save_steps=1000, eval_steps=0, max_length=512,
                      launcher="accelerate", num_processes=2, main_process_port=29633)
    lines = []

    def echo(line):
        lines.append(line)
        if line.startswith("[train] step 3/") and not any("[launch] SIGTERM" in seen for seen in lines):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="interrupted \\(SIGTERM\\)"):
        run_launched(cfg, "fp32", echo=echo)
    checkpoints = sorted((tmp_path / "adapter" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and 3 <= int(checkpoints[0].name.split("-")[1]) < 200, "\n".join(lines[-30:])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_failing_launch_reports_code_and_log_tail(tmp_path, tiny_model_dir):
    from ironman_nb.launch import LaunchFailed
    from ironman_nb.train import train

    cfg = TrainConfig(base_model=str(tiny_model_dir), data_dir=str(tmp_path / "no-data"), output_dir=str(tmp_path / "a"),
                      launcher="accelerate", num_processes=2, main_process_port=29632)
    with pytest.raises(LaunchFailed, match=r"accelerate exited with code [1-9]\d*\ncause: .*DataError: .*run notebooks/01_prepare_data"):
        train(cfg)


def test_a_second_machine_reports_its_part_without_reading_a_run_config(tmp_path, monkeypatch):
    """Machine 0 writes run_config.json; one found on machine 1 is an earlier run's (or, on a shared disk, being
    written): the result says where the adapter is instead."""
    import ironman_nb.launch as launch_module
    from ironman_nb.train import train

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "run_config.json").write_text('{"result": {"global_step": 999}}')  # an earlier run's
    monkeypatch.setattr(launch_module, "launch_command", lambda *a: [sys.executable, "-c", "print('joined')"])
    cfg = TrainConfig(data_dir=str(tmp_path / "data"), output_dir=str(out), launcher="accelerate", num_processes=8,
                      num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    result = train(cfg)
    assert result.summary()["value"].tolist() == [
        f"machine_rank 1 took part; machine_rank 0 writes the adapter to its {out.resolve()}"]
    assert result.resolved()["value"].tolist() == [str(out)]


def test_deepspeed_zero3_launch_saves_a_whole_adapter(tmp_path, tiny_model_dir):
    """The `deepspeed` launcher with the shipped ZeRO-3 config (one CPU process): the adapter comes out whole."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from ironman_nb.merge import merge
    from ironman_nb.train import train

    data = write_chat_data(tmp_path / "data", train_rows=8)
    result = train(TrainConfig(base_model=str(tiny_model_dir), data_dir=str(data), output_dir=str(tmp_path / "adapter"),
                               max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, logging_steps=1,
                               save_steps=100, eval_steps=0, max_length=512, learning_rate=5e-3, launcher="deepspeed",
                               num_processes=1, main_process_port=29633,
                               deepspeed_config=str(ROOT / "configs" / "ds_zero3.json")))
    assert result.run_config["result"]["global_step"] == 2
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # gathered, not ZeRO-3 shards
    merge(MergeConfig(base_model=str(tiny_model_dir), adapter_dir=str(tmp_path / "adapter"), output_dir=str(tmp_path / "m")))


def _stand_in(monkeypatch, code: str):
    """launch_command replaced by a Python stand-in for the launcher (run as the launcher is: in the package's folder,
    given the config path as its argument)."""
    import ironman_nb.launch as launch_module

    monkeypatch.setattr(launch_module, "launch_command",
                        lambda cfg, config_path, precision: [sys.executable, "-c", code, str(config_path), cfg.resume])


def test_relative_paths_of_a_jupyterlab_kernel_reach_the_launcher_absolute(tmp_path, monkeypatch):
    """The notebook's defaults are relative to notebooks/ ('../runs/lab/adapter'); the launcher runs elsewhere."""
    from ironman_nb.launch import run_launched

    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    _stand_in(monkeypatch, "import json, sys, pathlib; c = json.loads(pathlib.Path(sys.argv[1]).read_text()); "
                           "print('config', pathlib.Path(sys.argv[1]).is_absolute(), c['output_dir'], sys.argv[2])")
    cfg = TrainConfig(data_dir="../runs/lab/data", output_dir="../runs/lab/adapter", launcher="accelerate",
                      num_processes=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
                      resume="../runs/lab/adapter/checkpoints/checkpoint-4")
    lines = []
    run_launched(cfg, "fp32", echo=lines.append)
    adapter = tmp_path / "runs" / "lab" / "adapter"
    assert f"config True {adapter} {adapter / 'checkpoints' / 'checkpoint-4'}" in lines


def test_sigterm_reaches_workers_of_a_launcher_that_does_not_pass_it_on(tmp_path, monkeypatch):
    """The deepspeed runner (and accelerate with one process) dies of SIGTERM without passing it on: the signal
    goes to the launcher's whole process group, so the worker saves and stops."""
    import os
    import signal

    from ironman_nb.launch import run_launched
    from ironman_nb.train import TrainingInterrupted

    marker = tmp_path / "worker_stopped"
    worker = ("import signal, sys, time, pathlib\n"
              f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('saved'), sys.exit(0)))\n"
              "print('[train] step 1/9', flush=True)\n"
              "for _ in range(100): time.sleep(0.1)\n")
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {worker!r}])"  # passes nothing on
    _stand_in(monkeypatch, launcher)

    def echo(line):
        if line.startswith("[train] step 1/"):
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = TrainConfig(data_dir=str(tmp_path), output_dir=str(tmp_path / "a"), launcher="deepspeed",
                      deepspeed_config=str(ROOT / "configs" / "ds_zero3.json"))
    with pytest.raises(TrainingInterrupted):
        run_launched(cfg, "fp32", echo=echo)
    assert marker.read_text() == "saved"


def test_a_workers_error_is_the_cause_and_odd_bytes_do_not_stop_the_log(tmp_path, monkeypatch):
    """After init_process_group torch prefixes a worker's lines with [rankN]:, and the launcher's own
    ChildFailedError came out as the cause; a byte that is not UTF-8 stopped reading the log (UnicodeDecodeError)."""
    from ironman_nb.launch import LaunchFailed, run_launched

    _stand_in(monkeypatch, "import sys; out = sys.stdout.buffer; "
                           "out.write(b'caf\\xe9 au lait\\n[rank0]: Traceback (most recent call last):\\n'"
                           " b'[rank0]: ironman_nb.train.TrainingOutOfMemory: the GPU ran out of memory at step 3\\n'"
                           " b'torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \\n'); sys.exit(1)")
    cfg = TrainConfig(data_dir=str(tmp_path), output_dir=str(tmp_path / "a"), launcher="accelerate", num_processes=2)
    lines = []
    with pytest.raises(LaunchFailed, match=r"cause: ironman_nb.train.TrainingOutOfMemory: the GPU ran out of memory"):
        run_launched(cfg, "fp32", echo=lines.append)
    assert "caf\ufffd au lait" in lines


def test_a_launch_that_exits_0_without_finishing_is_not_read_as_an_earlier_runs_result(tmp_path, monkeypatch):
    """The deepspeed runner exits 0 when its launcher was killed by a signal; the run_config.json left from an
    earlier run was returned as this run's result."""
    from ironman_nb.launch import LaunchFailed, run_launched

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "run_config.json").write_text('{"result": {"global_step": 999}}')  # an earlier run's
    (out / "trainer_state.json").write_text('{"log_history": []}')
    _stand_in(monkeypatch, "print('launcher: child killed by a signal')")
    cfg = TrainConfig(data_dir=str(tmp_path), output_dir=str(out), launcher="deepspeed",
                      deepspeed_config=str(ROOT / "configs" / "ds_zero3.json"))
    with pytest.raises(LaunchFailed, match="exited with code 0, but the training did not report finishing"):
        run_launched(cfg, "fp32", echo=lambda line: None)
