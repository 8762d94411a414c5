"""Run the notebooks in order with papermill into one run folder.

    python -m ironman_nb run [--profile quick|full|gpu24gb] [--params FILE.yaml] [--run-dir DIR]
                             [-p NAME VALUE] [-r NAME VALUE] [--from STAGE] [--until STAGE] [--force]

Parameters are checked against each stage's config before any kernel starts (papermill itself only
warns about unknown names). Each stage's status lands in <run>/status.json.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import dataclasses
import datetime as _dt
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .config import (CompareConfig, ConfigError, MergeConfig, PlotConfig, PrepareConfig, PushConfig, StageConfig,
                     TrainConfig, closest_name, read_yaml)
from .data import URL_LIKE
from .io import atomic_write_json
from .launch import signals_handled

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
PROFILE_DIR = PROJECT_ROOT / "configs"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    config: type[StageConfig]
    # run folder -> the parameters that connect this stage to the others
    wiring: Callable[[Path], dict[str, str]]
    # run folder -> files or folders it reads that no parameter names (they count in its fingerprint)
    also_reads: Callable[[Path], tuple[Path, ...]] = lambda run: ()

    @property
    def notebook(self) -> Path:
        return NOTEBOOK_DIR / f"{self.name}.ipynb"


STAGES: tuple[Stage, ...] = (
    Stage("01_prepare_data", PrepareConfig, lambda run: {"output_dir": str(run / "data")}),
    Stage("02_train_lora", TrainConfig, lambda run: {"data_dir": str(run / "data"), "output_dir": str(run / "adapter")}),
    Stage(
        "03_plot_training",
        PlotConfig,
        lambda run: {"trainer_state": str(run / "adapter" / "trainer_state.json"), "output_dir": str(run / "plots")},
    ),
    Stage("04_merge_lora", MergeConfig, lambda run: {"adapter_dir": str(run / "adapter"), "output_dir": str(run / "merged")}),
    Stage(
        "05_compare",
        CompareConfig,
        lambda run: {"tuned_model": str(run / "merged"), "eval_data": str(run / "data" / "eval.jsonl"),
                     "output_dir": str(run / "compare")},
    ),
    # The model card takes the comparison, the charts and the training configuration from the run folder.
    Stage("06_push_to_hub", PushConfig, lambda run: {"model_dir": str(run / "merged")},
          also_reads=lambda run: (run / "compare", run / "plots", run / "adapter" / "run_config.json")),
)

STAGE_BY_NAME = {stage.name: stage for stage in STAGES}

# Parameters holding a path: a relative value given on the command line or in a params file is taken
# relative to where the runner was started, not to notebooks/ where the kernels run.
PATH_PARAMS = ("input_path", "data_dir", "output_dir", "trainer_state", "adapter_dir", "model_dir", "prompts_path", "eval_data",
               "deepspeed_config", "accelerate_config")


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Names and literal values of the cell tagged `parameters`."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    source = "".join(cells[0]["source"])
    params = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            params[node.targets[0].id] = ast.literal_eval(node.value)
    return params


def load_params_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--params {path}: file not found")
    data = read_yaml(file.read_text(encoding="utf-8-sig")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter names to values")
    return data


# YAML files in configs/ that are not profiles (accelerate's own config for the FSDP launcher).
NOT_PROFILES = ("accelerate_fsdp",)


def profile_params(profile: str) -> dict[str, Any]:
    path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file() or profile in NOT_PROFILES:
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if p.stem not in NOT_PROFILES)
        raise ConfigError(f"--profile {profile!r}: no {path.relative_to(PROJECT_ROOT)} (profiles: {', '.join(known)})")
    return load_params_file(str(path))


def _absolute_paths(params: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(params)
    for key in PATH_PARAMS:
        value = out.get(key)
        # Links stay as given, a Google Sheets link without its https:// too (data.read_sheet reads it).
        if (isinstance(value, str) and value and not URL_LIKE.match(value.strip()) and not Path(value).is_absolute()):
            out[key] = str((base / value).resolve())
    for key in ("base_model", "tuned_model"):  # a model is a Hub id unless a folder of that name exists here
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).is_dir():
            out[key] = str((base / value).resolve())
    # A checkpoint to resume from is a path too; "auto" and "never" are words, not folder names.
    value = out.get("resume")
    if isinstance(value, str) and value and value not in ("auto", "never") and not Path(value).is_absolute():
        out["resume"] = str((base / value).resolve())
    return out


def stage_params(layers: list[dict[str, Any]], run_dir: Path, cwd: Path) -> tuple[dict[str, dict], list[str]]:
    """Each stage's parameters from the layers (profile, params file, command line: later ones win), each layer's
    shared names first and then its own section for the stage; every problem found, listed."""
    stage_names = {s.name for s in STAGES}
    known_anywhere = {name for s in STAGES for name in s.config.field_names()}
    unknown = dict.fromkeys(k for layer in layers for k in layer if k not in stage_names and k not in known_anywhere)
    problems = []
    for key in unknown:
        near = closest_name(key, sorted(stage_names | known_anywhere))
        hint = f"did you mean {near!r}? " if near else ""
        problems.append(f"unknown parameter {key!r}: no notebook has it ({hint}stages: {', '.join(sorted(stage_names))})")
    result = {}
    for stage in STAGES:
        fields = set(stage.config.field_names())
        params: dict[str, Any] = {}
        for layer in layers:
            specific = layer.get(stage.name) or {}
            if not isinstance(specific, dict):
                problems.append(f"{stage.name}: expected a mapping of parameters")
                specific = {}
            # A name given for every notebook at a later layer (`-p learning_rate …`) beats a section of an
            # earlier one (the profile's `02_train_lora: {learning_rate: …}`); within a layer the section wins.
            params.update({k: v for k, v in layer.items() if k not in stage_names and k in fields})
            params.update(specific)
        params = stage.config.normalised({**stage.wiring(run_dir), **_absolute_paths(params, cwd)})
        defaults = notebook_parameters(stage.notebook)
        problems += [f"{stage.name}: {p}" for p in stage.config.check_params(params)]
        if not any(p.startswith(f"{stage.name}:") for p in problems):
            try:
                stage.config.from_params(**{**defaults, **params})
            except ConfigError as err:
                problems += [f"{stage.name}: {line}" for line in str(err).splitlines()]
        result[stage.name] = params
    return result, problems


# Files in input folders that do not feed the next stage (cards and charts written for people).
NOT_INPUTS = ("README.md", "*.png")


def _input_state(value: str, skip: tuple[str, ...] = NOT_INPUTS) -> list:
    """(relative path, size, mtime) of an input file, or of every file in an input folder but those named in
    `skip` (by default what a stage writes into its own input folder: 06's card and chart copy)."""
    import fnmatch

    path = Path(value)
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    if not path.is_dir():
        return []
    entries = []
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if not file.is_file() or "checkpoints" in relative.parts or any(p.startswith(".") for p in relative.parts):
            continue
        if any(fnmatch.fnmatch(file.name, pattern) for pattern in skip):
            continue
        stat = file.stat()
        entries.append((str(relative), stat.st_size, stat.st_mtime_ns))
    return entries


def fingerprint(stage: Stage, params: dict[str, Any], run_dir: Path) -> str:
    """Changes when the notebook, its parameters, or any file it reads changes."""
    digest = hashlib.sha256(stage.notebook.read_bytes())
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    for key in sorted(params):
        value = params[key]
        if key != "output_dir" and isinstance(value, str) and (key in PATH_PARAMS or key in ("base_model", "tuned_model")):
            digest.update(json.dumps([key, _input_state(value)]).encode())
    for path in stage.also_reads(run_dir):  # charts included: 06 puts plots/training_curves.png on the card
        digest.update(json.dumps([path.name, _input_state(str(path), skip=())]).encode())
    return digest.hexdigest()


def stage_output(params: dict[str, Any]) -> Path:
    """What a stage leaves in the run folder: its output_dir; for 06, which uploads, the model card it writes."""
    return Path(params["output_dir"]) if "output_dir" in params else Path(params["model_dir"]) / "README.md"


def _is_missing(path: Path) -> bool:
    """Deleted or empty: `rm -rf run/merged` to free disk must make the next run merge again."""
    if path.is_dir():
        return not any(path.iterdir())
    return not path.is_file() or path.stat().st_size == 0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def find_stage(name: str, option: str) -> int:
    """The index in STAGES of "02", "02_train_lora" or "train_lora"."""
    for index, stage in enumerate(STAGES):
        number, _, words = stage.name.partition("_")
        if name in (stage.name, number, words):
            return index
    near = closest_name(name, [s.name for s in STAGES])
    hint = f" (did you mean {near}?)" if near else ""
    raise ConfigError(f"{option} {name!r}: no such stage{hint}; stages: {', '.join(s.name for s in STAGES)} "
                      "(or their numbers, 01 to 06)")


def run(profile: str = "quick", params_file: str | None = None, run_dir: str | None = None,
        overrides: dict[str, Any] | None = None, log_output: bool = True, force: bool = False,
        from_stage: str | None = None, until_stage: str | None = None) -> Path:
    """Run every stage; with an existing run folder, skip stages done with unchanged inputs and parameters.

    `from_stage` runs that stage even if done (and the later ones as usual), leaving the earlier ones as they are;
    `until_stage` stops after that stage (`until_stage="01"`: check a new sheet without training)."""
    first = find_stage(from_stage, "--from") if from_stage else 0
    last = find_stage(until_stage, "--until") if until_stage else len(STAGES) - 1
    if first > last:
        raise ConfigError(f"--from {from_stage} comes after --until {until_stage}: nothing to run")
    cwd = Path.cwd()
    layers = [profile_params(profile), load_params_file(params_file), overrides or {}]
    run_path = Path(run_dir).resolve() if run_dir else PROJECT_ROOT / "runs" / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{profile}"
    per_stage, problems = stage_params(layers, run_path, cwd)
    if problems:
        raise ConfigError("parameters refused before any notebook ran:\n- " + "\n- ".join(problems))

    import papermill as pm

    run_path.mkdir(parents=True, exist_ok=True)
    status_path = run_path / "status.json"
    status = {"profile": profile, "run_dir": str(run_path), "stages": {}}
    if status_path.is_file():
        status["stages"] = json.loads(status_path.read_text(encoding="utf-8")).get("stages", {})
    for index, stage in enumerate(STAGES):
        if not first <= index <= last:
            continue
        output = run_path / f"{stage.name}.ipynb"
        elsewhere = runs_on_machine_zero(stage, per_stage)
        if elsewhere:
            status["stages"][stage.name] = {"status": "skipped", "reason": elsewhere}
            atomic_write_json(status_path, status)
            print(f"[ironman_nb] {stage.name} skipped: {elsewhere}", flush=True)
            continue
        stage_fingerprint = fingerprint(stage, per_stage[stage.name], run_path)
        previous = status["stages"].get(stage.name, {})
        if (not force and index != (first if from_stage else -1) and previous.get("status") == "done"
                and previous.get("fingerprint") == stage_fingerprint
                and output.is_file() and not _is_missing(stage_output(per_stage[stage.name]))):
            print(f"[ironman_nb] {stage.name} skipped: done before with the same inputs and parameters", flush=True)
            continue
        # Every parameter the notebook ran with, its defaults included (was `dry_run` on? which base_model?).
        effective = {**notebook_parameters(stage.notebook), **per_stage[stage.name]}
        entry = {"status": "running", "started": _now(), "params": effective, "notebook": str(output),
                 "fingerprint": stage_fingerprint}
        status["stages"][stage.name] = entry
        atomic_write_json(status_path, status)
        print(f"[ironman_nb] {stage.name} …", flush=True)
        started = time.perf_counter()
        received: list[int] = []  # termination signals that arrived while the stage ran
        try:
            with _forward_termination(received):
                pm.execute_notebook(
                    str(stage.notebook),
                    str(output),
                    parameters=per_stage[stage.name],
                    cwd=str(NOTEBOOK_DIR),
                    kernel_name="python3",
                    progress_bar=False,
                    log_output=log_output,
                )
        except BaseException as err:  # whatever stops the stage (a dead kernel, Ctrl-C) is recorded, then passed on
            interrupted = bool(received) or isinstance(err, KeyboardInterrupt)
            error = stage_error(err, received, output)
            entry.update(status="interrupted" if interrupted else "failed", finished=_now(),
                         seconds=round(time.perf_counter() - started, 1), error=error)
            atomic_write_json(status_path, status)
            if isinstance(err, KeyboardInterrupt) and not received:
                raise
            raise StageFailed(stage.name, error, output, signum=received[0] if received else None) from None
        entry.update(status="done", finished=_now(), seconds=round(time.perf_counter() - started, 1))
        atomic_write_json(status_path, status)
        print(f"[ironman_nb] {stage.name} done in {entry['seconds']} s → {output}", flush=True)
        if received:  # the signal came as the stage ended: it is done, and the run stops here as asked
            name = signal.Signals(received[0]).name
            raise StageFailed(stage.name, f"{name} received as it finished; run the same command again to go on with "
                              "the next stage", output, signum=received[0])
    return run_path


def runs_on_machine_zero(stage: Stage, per_stage: dict[str, dict]) -> str | None:
    """Why `stage` does not run here, on a machine other than machine_rank 0 of a several-machine training (None
    where it runs): such a machine only takes part in the training, whose adapter machine 0 writes."""
    rank = per_stage["02_train_lora"].get("machine_rank", 0)
    if rank and STAGES.index(stage) > STAGES.index(STAGE_BY_NAME["02_train_lora"]):
        return (f"this machine (machine_rank {rank}) took part in the training; the adapter is written on "
                "machine_rank 0, where this and the later stages run")
    return None


def stage_error(err: BaseException, received: list[int], output: Path) -> str:
    """What stopped a stage and what to do, for status.json and the terminal."""
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    if isinstance(err, pm.PapermillExecutionError):
        cause = f"{err.ename}: {err.evalue}"
    elif isinstance(err, DeadKernelError):
        cause = ("the notebook's kernel died, most often because the machine ran out of memory and the Linux OOM "
                 "killer stopped it (`dmesg` or the pod's events say so); the rendered notebook "
                 f"{output} shows the last cell it ran. Free memory or lower the stage's memory use, then run the "
                 "same command again")
    elif isinstance(err, KeyboardInterrupt) and not received:
        cause = "interrupted (Ctrl-C)"
    else:
        cause = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if not received:
        return cause
    return (f"{signal.Signals(received[0]).name} received: the run stopped. Run the same command again to continue: "
            "finished stages are skipped and training resumes from its last checkpoint (resume='auto'). The stage "
            f"ended with: {cause}")


# While a stage runs, these stop the run by way of the kernel; SIGHUP arrives when the terminal is closed.
TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _forward_termination(received: list[int]):
    """Pass SIGTERM/SIGHUP on to the kernel as SIGTERM and keep waiting for it; a second one stops waiting.

    jupyter_client starts the kernel in a session of its own, so a signal to the runner (a pod stopping, `kill`,
    a closed terminal) never reaches it: without this the runner dies, the kernel follows without saving, and
    status.json stays "running". A signal ignored when the runner started (SIGHUP under nohup) stays ignored.
    """

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped waiting for the kernel")
        received.append(signum)
        kernels = _child_pids()  # jupyter_client started the kernel as this process's child
        for pid in kernels:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not kernels:  # nothing to wait for (the kernel is not started yet, or there is no /proc to find it)
            raise KeyboardInterrupt(f"{signal.Signals(signum).name}: no kernel to wait for")
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"[ironman_nb] {signal.Signals(signum).name} received: asked the kernel to stop (training saves a "
                  "checkpoint first) and waiting for it; send SIGTERM again to stop without waiting", flush=True)

    return signals_handled(handler, [s for s in TERMINATION_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN])


def _child_pids() -> list[int]:
    """This process's children (the kernel papermill started), from /proc/<pid>/stat; none where there is no /proc."""
    me, children = os.getpid(), []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        # "pid (name) state ppid ...": the name may hold spaces and parentheses, so split after the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            children.append(int(entry.name))
    return children


class StageFailed(RuntimeError):
    """A stage failed, or was interrupted by `signum` (the run then exits with 128 + signum)."""

    def __init__(self, stage: str, error: str, notebook: Path, signum: int | None = None):
        verb = "interrupted" if signum else "failed"
        super().__init__(f"stage {stage} {verb}: {error}\nrendered notebook: {notebook}")
        self.stage = stage
        self.exit_code = 128 + signum if signum else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ironman_nb")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the notebooks in order with papermill")
    run_p.add_argument("--profile", default="quick", help="configs/<profile>.yaml (quick, full or gpu24gb)")
    run_p.add_argument("--params", help="YAML file of parameters: shared names, or per-notebook sections")
    run_p.add_argument("--run-dir", help="run folder (default runs/<time>-<profile>)")
    run_p.add_argument("--force", action="store_true", help="re-run every stage, even those done with the same inputs")
    run_p.add_argument("--from", dest="from_stage", metavar="STAGE",
                       help="start at this stage (02 or 02_train_lora), running it even if done; earlier ones stay")
    run_p.add_argument("--until", dest="until_stage", metavar="STAGE", help="stop after this stage (e.g. --until 01)")
    run_p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                       help="one parameter; VALUE is read as YAML (1234 is a number, true a boolean)")
    run_p.add_argument("-r", "--raw-param", nargs=2, action="append", metavar=("NAME", "VALUE"), default=[],
                       help="one parameter whose VALUE is kept as a string, as papermill's -r (e.g. -r repo_id 1234)")
    ns = parser.parse_args(argv)
    import logging

    # papermill streams each notebook's printed output through its logger at INFO: show it (headless runs,
    # `nohup … &` logs) as plain lines.
    logging.basicConfig(format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)

    overrides = {name: read_yaml(value) for name, value in ns.param}
    overrides.update(dict(ns.raw_param))
    try:
        run_path = run(ns.profile, ns.params, ns.run_dir, overrides, force=ns.force, from_stage=ns.from_stage,
                       until_stage=ns.until_stage)
    except (ConfigError, StageFailed) as err:
        print(f"[ironman_nb] {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else err.exit_code
    except KeyboardInterrupt:
        print("[ironman_nb] interrupted (Ctrl-C); status.json records the stage that was running as interrupted. "
              "Run the same command again to continue.", file=sys.stderr)
        return 128 + signal.SIGINT
    print(f"[ironman_nb] run complete: {run_path}")
    return 0
