"""Merge the LoRA adapter into its base model and save a standalone model folder — verified first.

The folder loads with plain `AutoModelForCausalLM.from_pretrained(folder)` (no peft). Its tokenizer
carries the training chat template with the persona prompt as the default system message, and its
generation config stops at the template's end-of-turn token. Nothing is reported as merged until:
the adapter's base is `base_model`; every adapter tensor is finite; the merged weights differ from the
base; and the merged model's logits equal base+adapter logits on a probe prompt within tolerance.
A failed check leaves any earlier merged folder untouched.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import DEFAULT_SYSTEM_PROMPT, MergeConfig
from .data import prompt_messages
from .hub import MERGE_INFO, run_failure
from .io import DISK_ADVICE, atomic_dir, atomic_write_json, disk_space_problem, is_disk_full, read_json
from .models import (
    end_of_turn_token,
    hub_id,
    load_model,
    load_tokenizer,
    releases_gpu_memory,
    resolve_device,
    resolve_model_path,
    resolve_precision,
    stop_token_ids,
    torch_dtype,
)

# Largest |logit difference| accepted between the merged model and base+adapter, by compute precision: a fixed
# part, plus a share of the largest |logit|, since in 16 bits rounding grows with the values (bf16 keeps 8
# significant bits: logits of 32-64 only to 0.25). A correct bf16 merge of a small Qwen2-shaped model differed
# by 0.375 at logits up to 26 and by 1.0 at up to 78 (tests/test_merge.py).
LOGIT_TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "fp16": 0.1}
RELATIVE_LOGIT_TOLERANCE = {"fp32": 0.0, "bf16": 2**-5, "fp16": 2**-8}
PROBE_PROMPT = "토니, 아크 원자로가 뭔지 한 문장으로 설명해 줘."
# Room for the tokenizer, configs and the info file beside the weights.
SMALL_FILES_BYTES = 64 * 2**20


class MergeError(RuntimeError):
    """A verification failed; the message says which and what to do."""


def persona_chat_template(template: str, system_prompt: str) -> str:
    """Wrap a chat template so a conversation without a system message gets the persona prompt."""
    literal = json.dumps(system_prompt, ensure_ascii=False)
    prefix = (
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages -%}"
        "{%- endif -%}"
    )
    return prefix + template


def probe_tolerance(reference_logits, compute: str) -> float:
    """The largest |logit difference| accepted on the probe prompt, for logits like `reference_logits`."""
    return LOGIT_TOLERANCE[compute] + RELATIVE_LOGIT_TOLERANCE[compute] * float(reference_logits.abs().max())


def check_adapter_base(adapter_dir: Path, base_model: str) -> str:
    config = read_json(adapter_dir / "adapter_config.json", "adapter_config.json (is adapter_dir the output_dir of notebook 02?)")
    trained_on = config.get("base_model_name_or_path")
    accepted = {base_model, hub_id(base_model)}
    try:
        accepted.add(resolve_model_path(base_model))
    except OSError:
        pass
    if trained_on not in accepted:
        raise MergeError(
            f"{adapter_dir / 'adapter_config.json'}: the adapter was trained on {trained_on!r}, "
            f"but base_model is {base_model!r}. Set base_model to the model the adapter was trained on."
        )
    return trained_on


def base_dtype(base_model: str, default: str) -> str:
    """The precision the base model's config.json names ("bf16", "fp16", "fp32"), else `default`."""
    from transformers import AutoConfig

    try:
        dtype = getattr(AutoConfig.from_pretrained(resolve_model_path(base_model)), "dtype", None)
    except (OSError, ValueError):
        return default
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}.get(str(dtype), default)


def check_adapter_finite(adapter_dir: Path) -> int:
    import torch
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise MergeError(f"{adapter_dir} holds adapter_model.bin (a pickled adapter, saved with "
                             "safe_serialization=False): save it again as safetensors, e.g. PeftModel.from_pretrained("
                             "base, folder).save_pretrained(folder)")
        raise MergeError(f"{path} not found: train the adapter first (notebook 02)")
    tensors = load_file(str(path))
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise MergeError(
            f"{path}: {len(bad)} adapter tensor(s) hold NaN or inf (first: {bad[0]}); the training diverged. "
            "Retrain with a lower learning_rate, or resume from an earlier checkpoint."
        )
    return len(tensors)


def _probe_inputs(tokenizer, system_prompt: str, device: str):
    text = tokenizer.apply_chat_template(prompt_messages(PROBE_PROMPT, system_prompt), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)


@dataclasses.dataclass
class MergeResult:
    output_dir: Path
    checks: dict

    def summary(self):
        import pandas as pd

        return pd.DataFrame(list(self.checks.items()), columns=["check", "result"]).set_index("check")


@releases_gpu_memory
def merge(cfg: MergeConfig) -> MergeResult:
    import torch
    from peft import PeftModel

    adapter_dir, output_dir = Path(cfg.adapter_dir), Path(cfg.output_dir)
    failure = run_failure(adapter_dir)
    if failure:
        raise MergeError(f"refusing to merge: {failure}")
    trained_on = check_adapter_base(adapter_dir, cfg.base_model)
    adapter_tensors = check_adapter_finite(adapter_dir)
    run_config = read_json(adapter_dir / "run_config.json", "run_config.json") if (adapter_dir / "run_config.json").is_file() else {}
    resolved = run_config.get("resolved", {})
    system_prompt = resolved.get("system_prompt") or DEFAULT_SYSTEM_PROMPT

    device = resolve_device()
    # fp32 on a CPU (exact, and the merge is one pass) and when fp32 is asked for (in bf16 most of a small W + BA
    # update rounds away), else bf16/fp16 on a GPU.
    compute = "fp32" if device == "cpu" or cfg.dtype == "fp32" else resolve_precision("auto", device)
    # auto: the training precision; for an adapter from another tool (no run_config.json), the base's own dtype
    # (not fp32 on a CPU: a 7B saved at twice the size of its bf16 base).
    save_dtype = cfg.dtype if cfg.dtype != "auto" else resolved.get("precision") or base_dtype(cfg.base_model, compute)
    # The adapter folder holds the tokenizer exactly as trained; older adapters without one use the base's.
    tokenizer = load_tokenizer(str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else cfg.base_model)
    base = load_model(cfg.base_model, compute, device)
    base.eval()
    probe = _probe_inputs(tokenizer, system_prompt, device)

    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    lora_modules = [name for name, module in model.named_modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer")]
    if not lora_modules:
        raise MergeError(f"{adapter_dir}: the adapter adds no LoRA layer to {cfg.base_model!r}")
    watched = [lora_modules[0], lora_modules[-1]]
    before = {name: model.get_submodule(name).base_layer.weight.detach().clone() for name in watched}
    with torch.no_grad():
        adapter_logits = model(**probe, use_cache=False).logits.float()
        merged = model.merge_and_unload()
        merged_logits = merged(**probe, use_cache=False).logits.float()
    changed = [
        name for name in watched
        if not torch.equal(merged.get_submodule(name.replace("base_model.model.", "", 1)).weight, before[name])
    ]
    if not changed:
        raise MergeError(
            "the merged weights equal the base weights: the adapter is a no-op (was it trained? lora B starts at zero)"
        )
    max_diff = float((merged_logits - adapter_logits).abs().max())
    tolerance = probe_tolerance(adapter_logits, compute)
    if not max_diff <= tolerance:
        raise MergeError(
            f"merged logits differ from base+adapter by {max_diff:.3g} on the probe prompt (tolerance {tolerance} in {compute})"
        )

    eot = end_of_turn_token(tokenizer)
    stop_ids = stop_token_ids(tokenizer, merged.generation_config)  # the base's own stop tokens stay
    tokenizer.chat_template = persona_chat_template(tokenizer.chat_template, system_prompt)
    merged.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.config.name_or_path = hub_id(cfg.base_model)
    merged = merged.to(torch_dtype(save_dtype))
    # The checks above ran in the compute precision; a weight beyond the saved dtype's range (fp16: 65,504)
    # becomes inf in the cast.
    overflowed = [name for name, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if overflowed:
        raise MergeError(f"{len(overflowed)} merged tensor(s) are not finite in {save_dtype} (first: {overflowed[0]}): "
                         "their values exceed its range; save with dtype='bf16' or 'fp32'. Nothing was written.")
    checks = {
        "adapter base": f"{trained_on} (matches base_model)",
        "adapter tensors finite": f"{adapter_tensors} tensors",
        "merged weights differ from base": f"{len(changed)}/{len(watched)} watched layers changed",
        "max |Δ logit| merged vs base+adapter": f"{max_diff:.2e} ≤ {tolerance:.3g} ({compute})",
        "end-of-turn token": eot,
        "saved dtype": save_dtype,
    }
    # An earlier merged folder stays until the new one is complete, so the whole new model must fit beside it.
    weight_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    problem = disk_space_problem(output_dir, weight_bytes + SMALL_FILES_BYTES, "the merged model")
    if problem:
        raise MergeError(f"{problem} Nothing was written.")
    try:
        with atomic_dir(output_dir) as tmp:
            merged.save_pretrained(tmp, max_shard_size="2GB")
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / MERGE_INFO, {
                "base_model": cfg.base_model,
                "base_model_hub_id": hub_id(cfg.base_model),
                "adapter_dir": str(adapter_dir.resolve()),
                "system_prompt": system_prompt,
                "end_of_turn_token": eot,
                "checks": checks,
            })
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise MergeError(f"{output_dir}: the disk filled up while the merged model was saved ({err}); the partial "
                         f"folder is removed and an earlier merged folder is kept. {DISK_ADVICE}") from err
    return MergeResult(output_dir, checks)
