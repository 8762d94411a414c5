"""Training beyond one process: `accelerate launch` or the `deepspeed` launcher, started from notebook 02.

Training inside a Jupyter kernel cannot span several GPUs with DeepSpeed, so the notebook writes the
resolved config, starts `python -m ironman_nb.train --config …` under the launcher as a subprocess, streams
its log into the notebook, and fails the cell with the launcher's exit code and the tail of its log.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .config import ConfigError, TrainConfig
from .io import atomic_write_bytes, atomic_write_json, read_json

# Set in the launched processes, so `train` runs there instead of launching again.
LAUNCHED_ENV = "IRONMAN_NB_LAUNCHED"
# Each launch's id: global rank 0 writes it to LAUNCH_DONE_FILE when its training finished.
LAUNCH_ID_ENV = "IRONMAN_NB_LAUNCH_ID"
LAUNCH_DONE_FILE = "launch_done.json"
LOG_TAIL_LINES = 40
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PROGRESS_FRAMES = re.compile(r"^.*(?:it/s|s/it)\]")  # up to the end of the last tqdm frame on the line
ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Failed|OutOfMemory|Interrupted)\b[\w.]*: ")
# torch.distributed prefixes each line a worker prints after its process group started.
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")
# The launchers' own reports that a worker failed: the worker's exception, printed before them, is the cause.
LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError")


class LaunchFailed(RuntimeError):
    pass


def launched() -> bool:
    """True inside a process started by a launcher: ours, or `deepspeed` / `accelerate launch` / torchrun from a shell."""
    return os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ


def launch_command(cfg: TrainConfig, config_path: Path, precision: str) -> list[str]:
    """The launcher's command line for `python -m ironman_nb.train --config config_path`."""
    entry = ["ironman_nb.train", "--config", str(config_path)]
    if cfg.launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch",
                   "--num_processes", str(cfg.num_processes * cfg.num_machines),
                   "--num_machines", str(cfg.num_machines), "--machine_rank", str(cfg.machine_rank),
                   "--main_process_port", str(cfg.main_process_port),
                   "--mixed_precision", {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"),
                   "--dynamo_backend", "no"]
        if cfg.num_machines > 1:
            command += ["--main_process_ip", cfg.main_process_ip]
        if cfg.accelerate_config:
            command += ["--config_file", str(Path(cfg.accelerate_config).resolve())]
        elif cfg.num_processes * cfg.num_machines > 1:
            command += ["--multi_gpu"]  # torchrun-style processes; on a CPU they join over gloo
        return command + ["-m"] + entry
    if cfg.launcher == "deepspeed":
        command = [sys.executable, "-m", "deepspeed.launcher.runner"]
        visible = [i for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "").split(",") if i]
        if cfg.num_machines > 1:
            # One launch per machine, each given its rank. Without a hostfile the runner refuses several nodes;
            # with one (written beside the config) and --no_ssh it starts this machine's processes itself.
            command += ["--hostfile", str(deepspeed_hostfile(config_path)), "--no_ssh", "--num_nodes",
                        str(cfg.num_machines), "--node_rank", str(cfg.machine_rank), "--master_addr",
                        cfg.main_process_ip, "--num_gpus", str(cfg.num_processes)]
        elif visible:
            # --num_gpus makes the runner drop CUDA_VISIBLE_DEVICES and take GPUs 0…n-1 (others' on a shared machine).
            if len(visible) < cfg.num_processes:
                raise ConfigError(f"TrainConfig.num_processes: {cfg.num_processes} processes, but CUDA_VISIBLE_DEVICES "
                                  f"shows {len(visible)} GPU(s) ({','.join(visible)})")
            command += ["--include", "localhost:" + ",".join(visible[:cfg.num_processes])]
        else:
            command += ["--num_gpus", str(cfg.num_processes)]
        return command + ["--master_port", str(cfg.main_process_port), "--module"] + entry
    raise ValueError(f"launcher {cfg.launcher!r}: nothing to launch")


def deepspeed_hostfile(config_path: Path) -> Path:
    return config_path.parent / "deepspeed_hostfile"


def write_deepspeed_hostfile(cfg: TrainConfig, config_path: Path) -> None:
    """The machines of a several-machine deepspeed run, by rank (names only label them: nothing connects by ssh)."""
    hosts = "".join(f"machine{rank} slots={cfg.num_processes}\n" for rank in range(cfg.num_machines))
    atomic_write_bytes(deepspeed_hostfile(config_path), hosts.encode())


@contextlib.contextmanager
def signals_handled(handler, signums=(signal.SIGTERM, signal.SIGINT)):
    """Within the block `handler` takes these signals, and the earlier handlers come back after it. Only the main
    thread may set handlers; elsewhere the block runs with the signals as they were."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


def _passed_on_to(process: subprocess.Popen, received: list[int]):
    """While the launcher runs, SIGTERM and SIGINT (a pod stopping, JupyterLab's Interrupt) go on to it as SIGTERM:
    accelerate and deepspeed pass that to the training processes, which save a checkpoint and stop. Without this
    the kernel stops and the training processes run on, orphaned."""

    def handler(signum, frame):
        received.append(signum)
        # To the launcher's whole process group (it runs in a session of its own): the deepspeed runner, and
        # accelerate with one process, die of SIGTERM without passing it on, which left the workers training.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        print(f"[launch] {signal.Signals(signum).name}: asked the launcher to stop the training processes (they save "
              "a checkpoint at the end of the step first)", flush=True)

    return signals_handled(handler)


def run_launched(cfg: TrainConfig, precision: str, echo=print):
    """Run training under the launcher; stream its output; return the TrainResult it wrote."""
    from .train import TrainResult

    # The launcher runs in the package's folder, the notebook in notebooks/: every path goes to it absolute.
    output_dir = Path(cfg.output_dir).resolve()
    resolved = dataclasses.replace(
        cfg,
        data_dir=str(Path(cfg.data_dir).resolve()),
        output_dir=str(output_dir),
        resume=cfg.resume if cfg.resume in ("auto", "never") else str(Path(cfg.resume).resolve()),
        deepspeed_config=str(Path(cfg.deepspeed_config).resolve()) if cfg.launcher == "deepspeed" else cfg.deepspeed_config,
        base_model=str(Path(cfg.base_model).resolve()) if Path(cfg.base_model).is_dir() else cfg.base_model,
    )
    if cfg.launcher == "deepspeed" and not Path(resolved.deepspeed_config).is_file():
        raise FileNotFoundError(f"deepspeed_config {cfg.deepspeed_config!r} not found (shipped: configs/ds_zero2.json, configs/ds_zero3.json)")
    config_path = atomic_write_json(output_dir / "launch_config.json", resolved.to_dict())
    if cfg.launcher == "deepspeed" and cfg.num_machines > 1:
        write_deepspeed_hostfile(cfg, config_path)
    command = launch_command(resolved, config_path, precision)
    echo(f"[launch] {' '.join(command)}")
    launch_id = secrets.token_hex(8)
    env = {**os.environ, LAUNCHED_ENV: "1", LAUNCH_ID_ENV: launch_id, "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    errors: list[str] = []  # the exception lines of the processes' tracebacks: the cause, above the launcher's noise
    received: list[int] = []  # signals passed on to the launcher
    # Bytes that are not UTF-8 (a library's message in another encoding) are replaced, not a reason to stop
    # reading: the closed pipe would kill the training processes at their next print.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                          errors="replace", env=env, start_new_session=True,
                          cwd=Path(__file__).resolve().parent.parent) as process, _passed_on_to(process, received):
        assert process.stdout is not None
        for raw in process.stdout:
            # Progress bars redraw with "\r" and cursor codes and end no line, so the processes' own lines (the
            # "[train] step" progress among them) arrive glued after a bar's last frame: keep only what follows it.
            line = PROGRESS_FRAMES.sub("", ANSI_CODES.sub("", raw.rstrip("\r\n").split("\r")[-1]))
            tail.append(line)
            unprefixed = RANK_PREFIX.sub("", line).strip()
            if (ERROR_LINE.match(unprefixed) and unprefixed not in errors
                    and not any(name in unprefixed for name in LAUNCHER_ERRORS)):
                errors.append(unprefixed)
            if line.strip() and not line.startswith("{'"):  # Trainer's own dict logs repeat the [train] lines
                echo(line)
        code = process.wait()
    if received:
        from .train import TrainingInterrupted

        raise TrainingInterrupted(
            f"interrupted ({signal.Signals(received[0]).name}): the training processes were asked to save a checkpoint "
            f"in {output_dir / 'checkpoints'} and stop ({cfg.launcher} exit code {code}); run again with resume='auto' "
            "to continue")
    if code != 0:
        cause = f"\ncause: {errors[0]}" if errors else ""
        raise LaunchFailed(f"{cfg.launcher} exited with code {code}{cause}\nlast lines of its log:\n" + "\n".join(tail))
    if cfg.machine_rank > 0:
        # Global rank 0, on machine 0, writes the adapter, trainer_state.json and run_config.json; a run_config.json
        # here would be an earlier run's (or, on a shared disk, one machine 0 may still be writing).
        note = f"machine_rank {cfg.machine_rank} took part; machine_rank 0 writes the adapter to its {output_dir}"
        return TrainResult(output_dir, {"config": cfg.to_dict(), "resolved": {}, "result": {"note": note}}, [])
    done = output_dir / LAUNCH_DONE_FILE
    if not done.is_file() or read_json(done).get("launch_id") != launch_id:
        # The deepspeed runner exits 0 when its launcher was killed by a signal: the run_config.json here would
        # be an earlier run's.
        raise LaunchFailed(f"{cfg.launcher} exited with code 0, but the training did not report finishing (no "
                           f"{done.name} of this launch in {output_dir})\nlast lines of its log:\n" + "\n".join(tail))
    run_config = read_json(output_dir / "run_config.json", "run_config.json")
    history = read_json(output_dir / "trainer_state.json", "trainer_state.json")["log_history"]
    return TrainResult(output_dir, run_config, history)
