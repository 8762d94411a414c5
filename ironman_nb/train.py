"""LoRA supervised fine-tuning with TRL's SFTTrainer, on the device's fast path.

Also the entry point for launchers: `python -m ironman_nb.train --config run_config.json`.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig
from .data import DataError, load_chat_records, tokenize_conversation
from .io import atomic_write_json, disk_space_problem, give_default_modes, read_json
from .launch import LAUNCH_DONE_FILE, LAUNCH_ID_ENV, launched, run_launched, signals_handled
from .models import (
    attention_implementation,
    gpu_memory,
    end_of_turn_token,
    hub_id,
    keep_freed_memory,
    load_model,
    load_tokenizer,
    releases_gpu_memory,
    resolve_device,
    resolve_precision,
    resolve_model_path,
    sdpa_without_cudnn,
    select_local_gpu,
    torch_dtype,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors")


@dataclasses.dataclass(frozen=True)
class FastPath:
    """What `auto` resolved to on this device, each choice overridable by its parameter."""

    device: str
    precision: str
    gradient_checkpointing: bool
    padding_free: bool
    shared_prefix: bool
    attn_implementation: str
    liger_kernel: bool = False
    fused_lora: bool = False
    # Whether sdpa may use cuDNN's attention kernels (CUDA; models.sdpa_without_cudnn).
    cudnn_attention: bool = False
    torch_compile: bool = False
    # With torch_compile: the activation memory budget its partitioner plans each compiled module's backward
    # for (1.0: its default; lower recomputes more — COMPILE_MEMORY_BUDGETS).
    compile_memory_budget: float | None = None
    # With checkpointing: how many decoder layers, spread evenly (None: all of them).
    checkpointed_layers: int | None = None
    # Samples per forward/backward and forward/backwards per optimizer step (merge_micro_batches may change
    # the configured split; their product, the samples per step, stays).
    micro_batch: int = 0
    accumulation_steps: int = 0

    @property
    def avoids_cudnn_attention(self) -> bool:
        """Whether training runs inside models.sdpa_without_cudnn: sdpa on CUDA, cudnn_attention off."""
        return self.device == "cuda" and self.attn_implementation == "sdpa" and not self.cudnn_attention


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """A rough peak of LoRA training for `gradient_checkpointing="auto"`, in bytes, by how many decoder layers
    are checkpointed.

    The frozen weights; what each decoder layer keeps for the backward per token (≈ 17·hidden + 4·intermediate
    elements: norm inputs in fp32, q/k/v/attention output, rotary, the MLP's gate, up, activation and product) —
    a checkpointed layer keeps only its input (hidden), and one layer's activations live again while it is
    recomputed, after the logits are gone; and the logits at every position, though the loss keeps them only at
    answer positions (bf16 and their bf16 gradient: 4 bytes per vocabulary entry; loss.summed_cross_entropy
    makes no fp32 copies, and drop_fp32_output_cast removes accelerate's). Measured on one H100, Qwen2-7B shape,
    batches of 4 persona samples (~507 tokens on average, 638 at most), no checkpointing: 30.8 GiB, with the
    earlier loss that held ~12 bytes per entry of fp32 copies; this gives 29.8 GiB at the average length and
    33.8 at the longest.
    (Autograd's saved tensors alone, counted on a CPU under bf16 autocast: ≈ 8.8·hidden + 4·intermediate with
    the fused LoRA forward, 12.8·hidden + 4·intermediate with PEFT's; the rest is temporaries.)
    """

    weights: int
    layer_activations: int  # one decoder layer, all tokens of the batch, not checkpointed
    layer_input: int  # what a checkpointed layer keeps instead
    logits: int
    layers: int
    # Activations that checkpointing does not touch: the shared prefix's pass, which runs without it and is
    # held for the whole optimizer step.
    fixed: int = 0

    def peak(self, checkpointed: int = 0) -> int:
        kept = (self.layers - checkpointed) * self.layer_activations + checkpointed * self.layer_input
        # The logits are freed by the time the backward recomputes a checkpointed layer's activations.
        recompute = self.layer_activations if checkpointed else 0
        return self.weights + self.fixed + kept + max(self.logits, recompute)


def estimate_training_memory(model_config, weight_bytes: int, precision: str, tokens: int,
                             prefix_tokens: int = 0, mlp_kept: int = 4) -> MemoryEstimate | None:
    """MemoryEstimate for a batch of `tokens` positions (with a shared prefix: the samples' suffixes) and a
    shared prefix of `prefix_tokens` run once for the batch; None for an architecture it does not know.

    `weight_bytes`: the loaded model's parameters as they are stored (a 4-bit base: packed; the activations take
    the bytes of `precision`). `mlp_kept`: the MLP's
    intermediate-sized tensors each layer keeps per token (4 eager; fewer compiled, COMPILE_MEMORY_BUDGETS)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden, layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    if not hidden or not layers:
        return None  # `auto` then keeps checkpointing off
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    element = 4 if precision == "fp32" else 2
    per_token_layer = (17 * hidden + mlp_kept * intermediate) * element
    return MemoryEstimate(weights=weight_bytes, layer_activations=tokens * per_token_layer,
                          layer_input=tokens * hidden * element,
                          logits=tokens * getattr(text, "vocab_size", 0) * 4, layers=layers,
                          fixed=prefix_tokens * per_token_layer * layers)


# More than the CUDA context of this process held elsewhere on its GPU is worth a word: `auto` plans without it.
GPU_HELD_ELSEWHERE_NOTICE = 2 * 2**30


def memory_budget(cfg: TrainConfig, device: str, device_memory: int | None = None) -> float:
    """The memory `auto` plans for, in bytes: `max_memory_gib`, else 90 % of the GPU memory this process can use
    (`device_memory`, by default models.gpu_memory: not what other processes hold; the CUDA context and
    fragmentation take a share, and the estimate runs high), else 0 (a CPU: no planning)."""
    if cfg.max_memory_gib:
        return cfg.max_memory_gib * 2**30
    if device != "cuda":
        return 0.0
    if device_memory is None:
        device_memory = gpu_memory().available
    return 0.9 * device_memory


# On a GPU the shared prefix pays off from this many samples per micro-batch: on an H100 (Qwen2-7B shape, 4 x 4
# samples per step) it ran slower than padded rows, at 16 x 1 2.6x faster (scripts/perf/README.md).
GPU_PREFIX_MIN_BATCH = 8


def wants_shared_prefix(cfg: TrainConfig, device: str, world_size: int, micro_batch: int) -> bool:
    """Whether the shared system-turn prefix runs, at `micro_batch` samples per micro-batch. It needs padded rows.
    On a CPU, where time follows FLOPs, it saves more than packing (the persona prompt is ~45 % of each sample);
    on a GPU it pays off with large micro-batches only (GPU_PREFIX_MIN_BATCH). Two forward calls per backward
    (prefix, then samples) are not for DDP / ZeRO gradient hooks. Not with LoRA dropout: the one prefix pass
    draws one dropout mask for every sample of the step, where separate samples draw their own (the same expected
    gradient, ~1.9× its spread at 8 samples and dropout 0.3)."""
    if cfg.shared_prefix != "auto":
        return cfg.shared_prefix == "on"
    least = GPU_PREFIX_MIN_BATCH if device == "cuda" else 2
    return (micro_batch >= least and cfg.padding_free != "on" and world_size == 1 and cfg.launcher != "deepspeed"
            and cfg.lora_dropout == 0)


def choose_micro_batch(cfg: TrainConfig, device: str, world_size: int, estimate, budget: float) -> int:
    """Samples per micro-batch: with `merge_micro_batches='auto'` on a GPU, the most (a divisor of the samples
    per optimizer step, at least per_device_train_batch_size) whose estimated peak fits `budget` with every
    layer checkpointed; elsewhere per_device_train_batch_size (a CPU, several processes, DeepSpeed — whose sharded
    weights the estimate does not model —, a fixed checkpointing choice, 4-bit).

    A LoRA step on a GPU waits on kernel launches more than on the kernels (H100, Qwen2-7B shape, 4 samples per
    micro-batch: kernels ran 13-30 % of the step's time), so fewer, larger micro-batches — the same samples per
    step and the same loss — beat smaller ones without checkpointing. `estimate(micro_batch)` is the
    MemoryEstimate of the longest such batch, or None."""
    given = cfg.per_device_train_batch_size
    if (cfg.merge_micro_batches == "off" or device != "cuda" or world_size > 1 or cfg.launcher == "deepspeed"
            or not budget or cfg.gradient_checkpointing != "auto" or cfg.quantization != "none"):
        return given
    per_step = given * cfg.gradient_accumulation_steps
    for micro_batch in range(per_step, given, -1):
        if per_step % micro_batch:
            continue
        memory = estimate(micro_batch)
        if memory is None:
            return given
        if memory.peak(memory.layers) <= budget:
            return micro_batch
    return given


def layers_to_checkpoint(memory: MemoryEstimate, budget: float) -> int:
    """The fewest decoder layers to checkpoint for the estimated peak to stay within `budget`: 0 when it fits
    without checkpointing, all of them when nothing fits."""
    return next((k for k in range(memory.layers + 1) if memory.peak(k) <= budget), memory.layers)


# torch_compile's activation memory budgets, each with the MLP's intermediate-sized tensors a layer then keeps per
# token for the backward, as the estimate counts them. Counted with saved-tensor hooks on a CPU under bf16
# autocast: eager 4.05·intermediate + 8.5·hidden (Qwen2-0.5B-shaped layers, 512 tokens); compiled, at budget 1.0
# 3.05 there and 3.38 on smaller layers, at 0.5 1.00, at 0.2 none (+ 7-9·hidden) — rounded up here, since the
# partitioner's choices move with the shapes. It picks what to recompute by FLOPs: first the activation, then
# the MLP's gate and up products — a share of one layer's forward, where checkpointing a layer recomputes all of it.
COMPILE_MEMORY_BUDGETS = ((1.0, 4), (0.5, 2), (0.2, 0))


def choose_compile_memory_budget(cfg: TrainConfig, estimate, budget: float) -> tuple[float, int]:
    """(activation memory budget, MLP tensors kept) for a compiled run: the least recomputation whose estimated
    peak without checkpointing fits `budget`. Where none fits, the partitioner's default, and `auto` checkpoints
    layers: a checkpointed layer recomputes its whole forward anyway, and a lower budget would recompute its MLP
    products a second time in the backward. The default too where checkpointing is not `auto` or there is no
    budget. `estimate(mlp_kept)`: the MemoryEstimate of the longest batch as it runs, or None."""
    default = COMPILE_MEMORY_BUDGETS[0]
    if cfg.gradient_checkpointing != "auto" or not budget:
        return default
    for choice in COMPILE_MEMORY_BUDGETS:
        memory = estimate(choice[1])
        if memory is None:
            return default
        if memory.peak() <= budget:
            return choice
    return default


def spread_layers(count: int, layers: int) -> list[int]:
    """`count` of `layers` indices, evenly spread from 0 (as transformers' every_n_layers where it divides)."""
    return [i * layers // count for i in range(count)]


def _partial_checkpointing_callback(count: int):
    from transformers import TrainerCallback

    class PartialCheckpointing(TrainerCallback):
        """Keep checkpointing on `count` evenly spread decoder layers only. `Trainer.train` turns it on for every
        layer just before `on_train_begin` (transformers' own `every_n_layers` only allows every n-th layer)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = checkpointable_layers(model)
            chosen = set(spread_layers(min(count, len(layers)), len(layers)))
            for index, layer in enumerate(layers):
                layer.gradient_checkpointing = index in chosen

    return PartialCheckpointing()


def choose_fast_path(cfg: TrainConfig, device: str, memory: MemoryEstimate | None = None, world_size: int = 1,
                     device_memory: int | None = None, model_type: str | None = None,
                     prefix_memory: MemoryEstimate | None = None) -> FastPath:
    """`memory`: estimate_training_memory of the longest batch; `prefix_memory`: the same with the shared prefix
    (its tokens held once, not once per sample); `device_memory`: the GPU's (default: asked, when
    `cfg.max_memory_gib` does not set the budget); `model_type`: the model's, for the attention implementation.
    `cfg`'s micro-batch is the one that runs (choose_micro_batch)."""
    precision = resolve_precision(cfg.precision, device)
    shared_prefix = wants_shared_prefix(cfg, device, world_size, cfg.per_device_train_batch_size)
    checkpointed = None
    if cfg.gradient_checkpointing == "auto":
        # Checkpointing costs up to ~1/3 more compute; pay it only where training without it would not fit the
        # budget (memory_budget), and then only on as few layers as make it fit — or on all of them when the
        # 4-bit profile says memory is what is short. With the shared prefix the batch holds its samples'
        # suffixes and one prefix.
        checkpointing = cfg.quantization == "4bit"
        planned = prefix_memory if shared_prefix and prefix_memory else memory
        budget = memory_budget(cfg, device, device_memory) if planned and not checkpointing else 0.0
        if budget:
            count = layers_to_checkpoint(planned, budget)
            checkpointing, checkpointed = count > 0, (count if 0 < count < planned.layers else None)
    else:
        checkpointing = cfg.gradient_checkpointing == "on"
    attn = attention_implementation(device, precision, model_type)
    if cfg.padding_free == "auto":
        # Packed rows save the padding; on CUDA, sdpa with the per-sample mask measured slower than padding,
        # so pack there only with flash attention's varlen kernels.
        padding_free = not shared_prefix and (device != "cuda" or attn == "flash_attention_2")
    else:
        padding_free = cfg.padding_free == "on"
    if shared_prefix and padding_free:
        raise ConfigError("TrainConfig.shared_prefix: 'on' needs padded rows; set padding_free='off' (or 'auto')")
    if shared_prefix and checkpointing and cfg.launcher == "deepspeed":
        # DeepSpeed makes checkpointing reentrant, which passes no gradient to the prefix's keys and values.
        raise ConfigError("TrainConfig.shared_prefix: 'on' with the deepspeed launcher needs gradient_checkpointing "
                          "'off'; or set shared_prefix='off'")
    liger_installed = importlib.util.find_spec("liger_kernel") is not None
    if cfg.liger_kernel == "on" and cfg.torch_compile:
        raise ConfigError("TrainConfig.liger_kernel: 'on' does not combine with torch_compile=True (compiling fuses "
                          "the same norms and MLP); set one of them off")
    if cfg.liger_kernel == "on" and (device != "cuda" or not liger_installed):
        raise ConfigError("TrainConfig.liger_kernel: 'on' needs a CUDA GPU and `pip install liger-kernel` "
                          f"(device {device}, liger-kernel {'installed' if liger_installed else 'not installed'})")
    # The 4-bit profile keeps its norms in fp32 (prepare for k-bit training); Liger's kernels are for bf16 runs.
    liger = cfg.liger_kernel == "on" or (cfg.liger_kernel == "auto" and device == "cuda" and liger_installed
                                         and cfg.quantization == "none" and not cfg.torch_compile)
    return FastPath(device, precision, checkpointing, padding_free, shared_prefix, attn, liger,
                    cudnn_attention=device == "cuda" and attn == "sdpa" and cfg.cudnn_attention,
                    checkpointed_layers=checkpointed, micro_batch=cfg.per_device_train_batch_size,
                    accumulation_steps=cfg.gradient_accumulation_steps)


def apply_liger_kernels(model) -> bool:
    """Liger's fused RMSNorm and SwiGLU kernels (Triton, CUDA) on this model instance; True if its type has them.

    The loss stays the project's (logits only at labelled positions). Liger's patch also swaps classes in the
    model's modeling module for models built later; those are put back, so only this instance changes.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.warning("liger_kernel: no Liger kernels for model type %r; training without them", model.config.model_type)
        return False
    module = sys.modules[type(model).__module__]
    saved = dict(vars(module))
    _apply_liger_kernel_to_instance(model=model, rope=False, cross_entropy=False, fused_linear_cross_entropy=False,
                                    rms_norm=True, swiglu=True)
    for name, value in saved.items():
        if vars(module).get(name) is not value:
            setattr(module, name, value)
    return True


def _fused_lora_forward(self, x, *args, **kwargs):
    """PEFT's LoRA `Linear.forward` for the plain training case, in fewer passes over memory.

    PEFT casts the layer's whole input to the adapter's dtype (fp32 beside a bf16 base: a copy there and, under
    autocast, one back), then scales the adapter's output and adds it in two more passes. Here the small adapter
    weights are cast instead, and one `addmm` adds the scaled low-rank product into the base output. Where the
    base, the adapter and the input share one dtype outside autocast (fp32 on a CPU), the whole layer is one
    autograd node (_lora_linear_function). Anything else (adapters off or merged, several adapters, DoRA and
    other variants, a LoRA bias, per-sample adapter names) goes to PEFT's own forward.
    """
    import torch
    import torch.nn.functional as F

    active = self.active_adapters
    adapter = active[0] if len(active) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or adapter not in self.lora_A
            or adapter in self.lora_variant or self.lora_B[adapter].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    base, dropout = self.base_layer, self.lora_dropout[adapter]
    lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    if (type(base) is torch.nn.Linear and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and (isinstance(dropout, torch.nn.Identity) or not dropout.training)
            and x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype
            and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()
            and not base._forward_hooks and not base._forward_pre_hooks):
        out = _lora_linear_function().apply(x.reshape(-1, x.shape[-1]), base.weight, base.bias, lora_a, lora_b,
                                            self.scaling[adapter])
        return out.view(*x.shape[:-1], out.shape[-1])
    result = base(x)
    down = F.linear(dropout(x), lora_a.to(x.dtype))
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]),
                        lora_b.to(x.dtype).t(), alpha=self.scaling[adapter])
    return fused.view(result.shape)


@functools.cache
def _lora_linear_function():
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ for 2-D x as one autograd node (W, b frozen).

    Autograd, given the same products one by one, computes the input's gradient in two parts and adds them in an
    extra pass over it, and allocates the sum of base and adapter outputs anew; here the adapter's part is added
    in place (addmm_). The low-rank products run in the layouts MKL ran fastest at ~1,000 rows (the gradient of
    A as (rank × rows)·x rather than xᵀ·(rows × rank), as autograd does: 0.14 vs 0.51 ms for a 576 × 576 layer;
    the rows' gradient at rank as (Bᵀ·gradᵀ)ᵀ rather than grad·B: 0.16 vs 0.42 ms). Measured on a 2-core AMD
    Zen 3 CPU in fp32, the seven LoRA layers of one SmolLM2 decoder layer, forward and backward at 980 rows:
    90–92 ms against 100–106 (without LoRA: 80–81)."""
    import torch

    class LoRALinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
            down = torch.mm(lora_a, x.t()).t()
            out = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
            out.addmm_(down, lora_b.t(), alpha=scaling)
            ctx.save_for_backward(x, weight, lora_a, lora_b, down)
            ctx.scaling = scaling
            return out

        @staticmethod
        def backward(ctx, grad):
            x, weight, lora_a, lora_b, down = ctx.saved_tensors
            grad_down = torch.mm(lora_b.t() * ctx.scaling, grad.t()).t()
            grad_b = torch.mm((down * ctx.scaling).t(), grad).t().contiguous()
            grad_a = torch.mm(grad_down.t(), x)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(grad, weight)
                grad_x.addmm_(grad_down, lora_a)
            return grad_x, None, None, grad_a, grad_b, None

    return LoRALinear


def fuse_lora_forwards(model) -> int:
    """Give this model's PEFT LoRA linear layers `_fused_lora_forward` (this instance only); how many."""
    import types

    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear]  # not the 4-bit / 8-bit subclasses
    for layer in layers:
        layer.forward = types.MethodType(_fused_lora_forward, layer)
    return len(layers)


COMPILE_RECOMPILE_LIMIT = 64


def compile_decoder_layers(decoder_layers: list, activation_memory_budget: float = 1.0) -> int:
    """torch.compile the modules of each decoder layer (`checkpointable_layers`) but the attention's own
    forward: the norms, the MLP and the attention's projections, LoRA layers included; how many modules.

    Each compiled module runs as generated kernels with one autograd node for its backward instead of a few dozen
    eager operators (on a GPU, each a kernel launch the step waits on). The attention forward stays eager: it
    writes the KV cache (the shared prefix's read-only one too), and a whole layer compiles once per layer index.
    The layers' modules share their compiled graphs; the first steps of each shape pay for compiling.
    `activation_memory_budget` (COMPILE_MEMORY_BUDGETS): below 1, the compiled backward recomputes more of the
    forward and the layers keep less. It is read when a graph compiles, so graphs compiled earlier in this
    process (another run's, with another budget) are dropped first."""
    import torch._dynamo
    import torch._functorch.config

    torch._dynamo.reset()
    torch._functorch.config.activation_memory_budget = activation_memory_budget

    # One function (a LoRA layer's forward, a norm's) compiles once per weight shape (q/o, k/v, gate/up, down),
    # grad mode (train, eval) and input kind (the prefix pass, layer 0's inputs need no gradient): more than
    # dynamo's default of 8 graphs per function, past which it runs the rest eagerly.
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), COMPILE_RECOMPILE_LIMIT))
    count = 0
    for layer in decoder_layers:
        for child in layer.children():
            targets = list(child.children()) if type(child).__name__.endswith("Attention") else [child]
            for module in targets:
                module.compile()
                count += 1
    return count


def build_dataset(records: list[dict], tokenizer, max_length: int, limit: int = 0):
    from datasets import Dataset

    if limit:
        records = records[:limit]
    rows, truncated = [], 0
    for record in records:
        encoded = tokenize_conversation(tokenizer, record["messages"], max_length)
        if not any(label != -100 for label in encoded["labels"]):
            truncated += 1  # the answer fell entirely past max_length: nothing to learn from this row
            continue
        truncated += len(encoded["input_ids"]) == max_length
        rows.append(encoded)
    if truncated:
        log.warning("%d samples longer than max_length=%d were truncated or skipped", truncated, max_length)
    return Dataset.from_list(rows) if rows else None


def longest_sample(dataset) -> int:
    """Tokens in the longest sample (Arrow's list lengths: no row is read into Python)."""
    import pyarrow.compute as pc

    return int(pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py())


def _missing_checkpoint_files(path: Path) -> list[str]:
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if "trainer_state.json" not in missing:
        try:  # written last; cut short by a full disk or a crash it would stop every resume
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            missing.append("trainer_state.json (unreadable)")
    return missing


def _nonfinite_adapter_tensors(path: Path) -> int:
    """How many of a checkpoint's adapter tensors hold NaN or inf (a step can go bad between two log lines)."""
    import torch
    from safetensors.torch import load_file

    return sum(not bool(torch.isfinite(t).all()) for t in load_file(str(path / "adapter_model.safetensors")).values())


def checkpoint_step(path: str | Path) -> int:
    return int(json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8")).get("global_step", 0))


def find_resume_checkpoint(checkpoint_dir: Path, resume: str) -> str | None:
    """'auto': the newest complete checkpoint (trainer state and adapter files present); 'never': None; else a path."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        missing = _missing_checkpoint_files(path)
        if missing:
            raise FileNotFoundError(f"resume={resume!r}: not a complete checkpoint (missing {', '.join(missing)})")
        if _nonfinite_adapter_tensors(path):
            raise ValueError(f"resume={resume!r}: its adapter holds NaN or inf; resume from an earlier checkpoint")
        return str(path)
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for path in candidates:
        missing = _missing_checkpoint_files(path)
        if missing:
            log.warning("skipping incomplete checkpoint %s (missing %s)", path, ", ".join(missing))
        elif _nonfinite_adapter_tensors(path):
            log.warning("skipping checkpoint %s: its adapter holds NaN or inf", path)
        else:
            return str(path)
    return None


# Parameters that make checkpoints of one run unusable for another: `resume="auto"` only continues a run
# whose checkpoints were made with the same values (epochs, steps, logging and saving may change).
RUN_IDENTITY = ("base_model", "data_dir", "max_length", "max_train_samples", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                "lr_scheduler_type", "seed")
IDENTITY_FILE = "run_identity.json"


def load_checkpoint_weights(trainer, checkpoint: str | Path) -> None:
    """The trainer's model and state as the checkpoint saved them (its adapter weights and log history)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    checkpoint = Path(checkpoint)
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(trainer.model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{checkpoint}: its adapter does not fit this model ({len(missing)} LoRA weights missing, "
                         f"{len(result.unexpected_keys)} unexpected); run with resume='never' to train again")
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def run_identity(cfg: TrainConfig) -> dict:
    """What makes a run's checkpoints its own: the RUN_IDENTITY parameters, the training data itself (notebook 01
    rewrites the same data folder), the 4-bit base and the number of processes (samples per step, data order)."""
    identity = {name: getattr(cfg, name) for name in RUN_IDENTITY}
    train_file = Path(cfg.data_dir) / "train.jsonl"
    identity["train_data_sha256"] = hashlib.sha256(train_file.read_bytes()).hexdigest() if train_file.is_file() else None
    identity["quantization"] = cfg.quantization
    identity["processes"] = int(os.environ.get("WORLD_SIZE", "1"))
    return identity


def set_aside_checkpoints(checkpoint_dir: Path, why: str) -> None:
    """Move a checkpoint folder out of the way (never delete it), so that `resume="auto"` cannot pick from it."""
    stale = checkpoint_dir.with_name(f"{checkpoint_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(checkpoint_dir, stale)
    log.warning("checkpoints in %s %s: starting fresh; they are kept in %s", checkpoint_dir, why, stale)


def set_aside_foreign_checkpoints(cfg: TrainConfig, checkpoint_dir: Path) -> None:
    """Move checkpoints made with other run-defining parameters, or left when `resume="never"`, out of the way."""
    identity = run_identity(cfg)
    path = checkpoint_dir / IDENTITY_FILE
    if cfg.resume == "auto" and path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (earlier.get(k), v) for k, v in identity.items() if earlier.get(k) != v}
        if changed:
            shown = {k: (a[:12], b[:12]) if k.endswith("sha256") and a and b else (a, b) for k, (a, b) in changed.items()}
            set_aside_checkpoints(checkpoint_dir, "were made with other parameters ("
                                  + ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in shown.items()) + ")")
    elif cfg.resume == "never" and any(checkpoint_dir.glob("checkpoint-*")):
        # Left in place they would mix with this run's, and a later resume="auto" could pick an older run's.
        set_aside_checkpoints(checkpoint_dir, "belong to an earlier run (resume='never')")
    atomic_write_json(path, identity)


def planned_steps(trainer) -> int:
    """The optimizer steps this training runs to, counted as transformers' Trainer counts them."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    per_process = math.ceil(len(trainer.train_dataset) / max(args.world_size, 1))
    batches = math.ceil(per_process / args.per_device_train_batch_size)
    return math.ceil(args.num_train_epochs * max(math.ceil(batches / args.gradient_accumulation_steps), 1))


def finished_result(output_dir: Path, step: int) -> "TrainResult | None":
    """The saved result of a training that already reached `step`, if output_dir holds it whole."""
    run_config = read_json(output_dir / "run_config.json") if (output_dir / "run_config.json").is_file() else {}
    if (run_config.get("failed") or (run_config.get("result") or {}).get("global_step") != step
            or _missing_checkpoint_files(output_dir)):
        return None
    return TrainResult(output_dir, run_config, read_json(output_dir / "trainer_state.json")["log_history"])


def common_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens every sequence shares (slice comparisons: fast on a whole training set)."""
    first = sequences[0]
    length = len(first)
    for seq in sequences[1:]:
        n = min(length, len(seq))
        if seq[:n] != first[:n]:
            n = next(i for i in range(n) if seq[i] != first[i])
        length = n
        if not length:
            break
    return length


def shared_prefix_length(sequences: list[list[int]], head: int) -> int:
    """The length of the system turn most samples start with: the common prefix of the rows that share the most
    common first `head` tokens, if they are most of the rows (a few rows with a system prompt of their own must
    not make it 0 for all); else of all rows."""
    starts = collections.Counter(tuple(s[:head]) for s in sequences)
    start, count = starts.most_common(1)[0]
    if 2 * count > len(sequences) and count > 1:
        return common_prefix_length([s for s in sequences if tuple(s[:head]) == start])
    return common_prefix_length(sequences)


def next_token_targets(labels):
    """(batch, positions): position t's target is token t + 1's label; the last position predicts nothing."""
    import torch

    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


def answer_positions(targets):
    """The flat positions (row · width + column) of `targets` (next_token_targets) that are answer tokens."""
    return (targets != -100).flatten().nonzero().squeeze(1)


@dataclasses.dataclass
class SharedPrefixCollator:
    """Pad a batch of samples, splitting off the tokens every sample starts with (the persona system turn).

    The prefix is run through the model once per optimizer step and its keys/values reused by every sample,
    instead of once per sample. It stops before the first labelled token, so no loss term changes. `max_prefix`
    (the training set's common prefix) keeps it the same for every batch, so that micro-batches of one step can
    share one prefix pass even where a batch's samples happen to share a few more tokens.

    `answer_index`: the positions (row · width + column) whose next token is an answer token, found here on the
    CPU — on a GPU, finding them in the model's inputs (a boolean mask's nonzero) would wait for the forward.
    """

    pad_token_id: int
    min_prefix: int = 16
    max_prefix: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        ids = [list(e["input_ids"]) for e in examples]
        labels = [list(e["labels"]) for e in examples]
        first_label = min(next((i for i, x in enumerate(row) if x != -100), len(row)) for row in labels)
        prefix = min(common_prefix_length(ids), first_label - 1, min(len(x) for x in ids) - 1)
        if self.max_prefix is not None and self.max_prefix >= self.min_prefix:
            prefix = min(prefix, self.max_prefix)
        if len(ids) < 2 or prefix < self.min_prefix:
            prefix = 0
        width = max(len(x) for x in ids) - prefix
        batch = {
            "input_ids": torch.tensor([x[prefix:] + [self.pad_token_id] * (width - len(x) + prefix) for x in ids]),
            "attention_mask": torch.tensor([[1] * (len(x) - prefix) + [0] * (width - len(x) + prefix) for x in ids]),
            "labels": torch.tensor([x[prefix:] + [-100] * (width - len(x) + prefix) for x in labels]),
        }
        batch["answer_index"] = answer_positions(next_token_targets(batch["labels"]))
        if prefix:
            batch["prefix_ids"] = torch.tensor(ids[0][:prefix])
        return batch


@dataclasses.dataclass
class _HeldPrefix:
    """One optimizer step's prefix pass: its keys/values with their graph, and the detached copies
    (autograd leaves) that the step's micro-batches read. Gradients add up on the leaves and go back through
    the prefix pass once, before the optimizer step."""

    ids: Any
    cache: Any  # the prefix pass's cache, its layers holding the leaves
    outputs: list
    leaves: list

    def cache_for(self, batch: int):
        """A cache for one micro-batch: the leaves repeated per sample, read-only (read_only_prefix)."""
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        cache.batch_repeat_interleave(batch)
        return read_only_prefix(cache)

    def backward(self) -> None:
        import torch

        pairs = [(out, leaf.grad) for out, leaf in zip(self.outputs, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])


def _prefix_and_new(self, key_states, value_states, *args, **kwargs):
    import torch

    return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def read_only_prefix(cache):
    """This prefix cache, its layers made to return prefix + new keys/values without storing the new ones.

    A training forward only reads the prefix, so it may run twice — a checkpointed layer is recomputed in the
    backward — and see the same prefix both times (an appending cache would hold the suffix twice by then).
    Plain (DynamicLayer) caches only: a sliding-window or quantized layer keeps a different state."""
    import types

    from transformers.cache_utils import DynamicLayer

    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise ConfigError(f"TrainConfig.shared_prefix: the model's cache layer {index} is a "
                              f"{type(layer).__name__}; the shared prefix supports plain caches only — set "
                              "shared_prefix='off'")
        layer.update = types.MethodType(_prefix_and_new, layer)
    return cache


def checkpointable_layers(model) -> list:
    """The model's decoder layers that gradient checkpointing can wrap (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def prefix_cache_under_checkpointing(decoder_layers: list, run_prefix: bool):
    """Checkpointed decoder layers and the shared prefix: transformers drops a layer's cache under checkpointing,
    since a recompute would write it twice. For the samples' forward (`run_prefix=False`) the cache is read-only
    (read_only_prefix), so the layers keep it; the prefix pass itself (`run_prefix=True`), which writes the
    cache, runs without checkpointing (its activations are held for the step: MemoryEstimate.fixed).
    `decoder_layers`: checkpointable_layers of the model."""
    layers = [layer for layer in decoder_layers if layer.gradient_checkpointing]
    for layer in layers:
        if run_prefix:
            layer.gradient_checkpointing = False
        else:
            layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            if run_prefix:
                layer.gradient_checkpointing = True
            else:
                del layer._can_checkpoint_with_cache


@contextlib.contextmanager
def answer_rows_only(model, index, shape):
    """Within this block the model's LM head runs only on the hidden states at `index` (flat positions in a
    `shape` = batch × positions input): logits (rows, vocabulary) for the answer tokens and nothing else.

    transformers' `logits_to_keep` takes one list of positions for the whole batch, so it would keep each position
    that is an answer in *some* row: the other rows' prompt and padding there too (15-20 % more rows for 4
    persona samples).
    """
    head = model.get_output_embeddings()
    if head is None:  # compute_loss then selects the answer rows from the logits
        yield
        return

    def select(module, args):
        hidden = args[0]
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(shape):
            return (hidden.flatten(0, 1).index_select(0, index), *args[1:])
        return None

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def drop_fp32_output_cast(model) -> bool:
    """Undo accelerate's cast of every output to fp32 under mixed precision (autocast stays); True if there was one.

    For a causal LM that cast is a full fp32 copy of the logits (answer rows × vocabulary: 49k-152k entries
    each) and, in the backward, of their gradient. The loss reads bf16 / fp16 logits a chunk at a time in fp32
    (loss.summed_cross_entropy), so the copy is pure cost: time, and memory — ~0.6 GiB per 1,000 answer tokens
    of Qwen2's 152k vocabulary, and as much again for the gradient.
    """
    import types

    from accelerate.utils.operations import ConvertOutputsToFp32

    forward = getattr(model, "forward", None)
    bound = hasattr(forward, "__func__")  # accelerate wraps a bound forward's function, else the callable
    converter = getattr(forward.__func__ if bound else forward, "__wrapped__", None)
    if not isinstance(converter, ConvertOutputsToFp32):
        return False
    model.forward = types.MethodType(converter.model_forward, model) if bound else converter.model_forward
    return True


class RealTokenCount:
    """A trainer mix-in counting the real (unpadded) tokens trained on, shared prefix included, without a GPU sync
    per micro-batch: the count stays a tensor on the device until `real_tokens_seen` is read."""

    _real_tokens = 0

    def count_real_tokens(self, inputs, extra: int = 0) -> None:
        mask = inputs.get("attention_mask")
        self._real_tokens = self._real_tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel()) + extra

    @property
    def real_tokens_seen(self) -> int:
        return int(self._real_tokens)


def epoch_seeded_length_grouped_sampler(sampler, seed: int):
    """transformers' length-grouped order, drawn from (seed, epoch) instead of the global random state.

    transformers' sampler draws each epoch's order from the global generator when the epoch starts; a run resumed
    in its second epoch or later restores that state only afterwards, so it redrew epoch 1's order and skipped
    into it — samples seen twice, others never, in that epoch. Trainer calls `set_epoch` before each epoch."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):
            generator = torch.Generator().manual_seed(seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    return EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths)


def _sft_trainer_class():
    import torch
    from trl import SFTTrainer

    from .loss import summed_cross_entropy

    class PersonaSFTTrainer(RealTokenCount, SFTTrainer):
        """SFTTrainer with a loss that does only the work a persona run needs.

        - Logits only where labels are kept: TRL's loss also computes entropy and top-1 accuracy over the full
          vocabulary at every labelled position; with a 49k–152k vocabulary those extras cost. The cross-entropy
          over them runs a few rows at a time (loss.summed_cross_entropy), with no fp32 copy of the logits.
        - A shared prefix (SharedPrefixCollator) runs once per optimizer step, however many micro-batches
          the step accumulates; its cache is repeated for every sample.
        - Entropy and token accuracy are logged only with `token_metrics=True`.
        """

        loss_is_scaled_for_ga = True  # the loss below is divided by the tokens of the whole accumulated batch

        def __init__(self, *args, token_metrics: bool = False, avoid_cudnn_attention: bool = False,
                     keep_freed_host_memory: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.avoid_cudnn_attention = avoid_cudnn_attention
            self.keep_freed_host_memory = keep_freed_host_memory
            self.model_accepts_loss_kwargs = True  # so Trainer counts num_items_in_batch for us
            self.token_metrics = token_metrics
            self.prefix_passes = 0  # forward passes of the shared prefix while training
            self._held_prefix: _HeldPrefix | None = None
            self._checkpointable: list | None = None
            self._unwrapped: tuple | None = None  # (model as passed, the model inside any wrapper)
            self._parameters_counted: int | None = None
            # Once per optimizer step needs a backward of its own after the micro-batches' backward; DeepSpeed,
            # FSDP and DDP reduce gradients inside each backward, so there the prefix runs per micro-batch.
            self.prefix_per_step = not (self.is_deepspeed_enabled or self.is_fsdp_enabled
                                        or self.accelerator.num_processes > 1)

        def _get_train_sampler(self, train_dataset=None):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                return epoch_seeded_length_grouped_sampler(sampler, self.args.data_seed or self.args.seed)
            return sampler

        @torch.no_grad()
        def _log_token_metrics(self, logits, targets, mode: str) -> None:
            """TRL's per-step entropy and top-1 accuracy at the answer positions (a full-vocabulary pass each).

            logits: (answer tokens, vocabulary); targets: (answer tokens,)."""
            log_probs = logits.log_softmax(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1).sum()
            correct = (logits.argmax(-1) == targets).sum()
            gather = self.accelerator.gather_for_metrics
            count = gather(torch.tensor(targets.numel(), device=targets.device)).sum()
            if count > 0:
                self._metrics[mode]["entropy"].append((gather(entropy).sum() / count).item())
                self._metrics[mode]["mean_token_accuracy"].append((gather(correct).sum() / count).item())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inner = self._inner_model(model)
            drop_fp32_output_cast(inner)  # once accelerate has wrapped the model; a no-op after that
            labels = inputs.pop("labels")
            prefix = inputs.pop("prefix_ids", None)
            targets = next_token_targets(labels)
            index = inputs.pop("answer_index", None)  # SharedPrefixCollator's, found without a GPU sync
            if index is None:
                index = answer_positions(targets)
            head_rows = answer_rows_only(inner, index, targets.shape)
            if prefix is None:
                # Packed rows (position_ids, no mask) attend within each sample only without a KV cache.
                with head_rows:
                    outputs = model(**inputs, use_cache=False)
                prefix_tokens = 0
            else:
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                batch, width, prefix_tokens = ids.shape[0], ids.shape[1], prefix.numel()
                if self.prefix_per_step and model.training and torch.is_grad_enabled():
                    cache = self._step_prefix(model, prefix).cache_for(batch)
                else:
                    cache = self._prefix_pass(model, prefix)
                    cache.batch_repeat_interleave(batch)
                    read_only_prefix(cache)
                positions = torch.arange(prefix_tokens, prefix_tokens + width, device=ids.device)[None].expand(batch, -1)
                full_mask = torch.cat([mask.new_ones(batch, prefix_tokens), mask], dim=1)
                with head_rows, prefix_cache_under_checkpointing(self._decoder_layers(inner), run_prefix=False):
                    outputs = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=cache,
                                    use_cache=True)
            logits = outputs.logits
            if logits.dim() == 3:  # a model that called its head in another shape than answer_rows_only expects
                logits = logits.flatten(0, 1).index_select(0, index)
            answer_targets = targets.flatten().index_select(0, index)
            loss_sum = summed_cross_entropy(logits, answer_targets)
            if self.token_metrics:
                self._log_token_metrics(logits.detach().float(), answer_targets, "train" if model.training else "eval")
            count = num_items_in_batch if num_items_in_batch is not None else answer_targets.numel()
            loss = loss_sum / torch.as_tensor(count, device=loss_sum.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            if model.training:
                self.count_real_tokens(inputs, prefix_tokens * labels.shape[0])
            return (loss, outputs) if return_outputs else loss

        def _prefix_pass(self, model, prefix):
            """The shared prefix through the model, batch 1: its cache."""
            if model.training:
                self.prefix_passes += 1
            from transformers import DynamicCache

            inner = self._inner_model(model)
            # Our own cache: under checkpointing the model would make none (it sets use_cache=False).
            cache = DynamicCache(config=inner.config)
            with prefix_cache_under_checkpointing(self._decoder_layers(inner), run_prefix=True):
                # No position's logits (the LM head is a GEMV over the whole vocabulary): the cache is the point.
                model(input_ids=prefix[None], cache=cache, use_cache=True,
                      logits_to_keep=torch.zeros(0, dtype=torch.long, device=prefix.device))
            return cache

        def _inner_model(self, model):
            """The model inside DDP / FSDP / DeepSpeed, if any; looked up once per wrapper (accelerate's
            unwrap_model walks every module to look for compiled ones: ~10 ms a call for a 28-layer LoRA model)."""
            if self._unwrapped is None or self._unwrapped[0] is not model:
                self._unwrapped = (model, self.accelerator.unwrap_model(model))
            return self._unwrapped[1]

        def floating_point_ops(self, inputs) -> int:
            """Trainer's count for `total_flos` (6 · input tokens · non-embedding parameters), with the parameters
            counted once: Trainer counts them again for every micro-batch, walking every module (~20 ms a
            micro-batch for a 28-layer LoRA model, time a GPU step otherwise spends computing)."""
            ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
            if ids is None or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if self._parameters_counted is None:
                self._parameters_counted = self.model.num_parameters(exclude_embeddings=True)
            return 6 * ids.numel() * self._parameters_counted

        def _decoder_layers(self, inner) -> list:
            """checkpointable_layers of the trained model, found once (the shared prefix asks per micro-batch)."""
            if self._checkpointable is None:
                self._checkpointable = checkpointable_layers(inner)
            return self._checkpointable

        def _step_prefix(self, model, prefix) -> _HeldPrefix:
            """This optimizer step's prefix pass: run on its first micro-batch, reused by the others."""
            held = self._held_prefix
            if held is not None and torch.equal(held.ids, prefix):
                return held
            self.flush_prefix_gradients()  # a different prefix (mixed system prompts): the held one is done
            cache = self._prefix_pass(model, prefix)
            outputs, leaves = [], []
            for layer in cache.layers:
                for name in ("keys", "values"):
                    output = getattr(layer, name)
                    if output is None:  # a layer that reuses another layer's keys/values
                        continue
                    leaf = output.detach().requires_grad_(output.requires_grad)
                    setattr(layer, name, leaf)
                    outputs.append(output)
                    leaves.append(leaf)
            self._held_prefix = _HeldPrefix(prefix, cache, outputs, leaves)
            return self._held_prefix

        def flush_prefix_gradients(self) -> None:
            """Send the step's gradients at the prefix keys/values back through the prefix pass."""
            held, self._held_prefix = self._held_prefix, None
            if held is not None:
                held.backward()

        def train(self, *args, **kwargs):
            # Around the whole loop: checkpointed layers recompute their forward in the backward, with the
            # kernels the forward used.
            with sdpa_without_cudnn(self.avoid_cudnn_attention), keep_freed_memory(self.keep_freed_host_memory):
                return super().train(*args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.accelerator.sync_gradients:  # the step's last micro-batch: the optimizer steps next
                self.flush_prefix_gradients()
            return loss

    return PersonaSFTTrainer


def _nonfinite_stop_callback():
    import math

    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        """Stop at once when the loss or grad norm is NaN/inf; the last good checkpoint stays."""

        def __init__(self):
            self.bad: dict | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            # In fp16 a non-finite grad norm with a finite loss is the grad scaler's overflow: that step is skipped
            # and the scale halved, as designed (at the start and whenever the scale grows).
            for key in ("loss",) if args.fp16 else ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(value):
                    self.bad = {"step": state.global_step, key: value}
                    control.should_training_stop = True
                    control.should_save = False
            return control

    return StopOnNonFinite()


def _progress_log_callback():
    from transformers import TrainerCallback

    class ProgressLog(TrainerCallback):
        """One plain line per log: readable in a papermill log, a nohup log and a notebook alike."""

        def __init__(self):
            # An evaluation outside train() (a run finished from its last checkpoint) logs before any train begins.
            self.started, self.first_step = None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.perf_counter(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            values = " ".join(f"{k} {logs[k]:.4g}" for k in ("loss", "eval_loss", "grad_norm", "learning_rate") if k in logs)
            if not values or not state.is_world_process_zero:
                return
            timing = ""
            if self.started is not None:
                done, elapsed = state.global_step - self.first_step, time.perf_counter() - self.started
                eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
                timing = f" | {elapsed:.0f} s, ETA {eta:.0f} s"
            print(f"[train] step {state.global_step}/{state.max_steps} {values}{timing}", flush=True)

    return ProgressLog()


def _terminate_callback():
    from transformers import TrainerCallback

    class SaveOnTerminate(TrainerCallback):
        """After SIGTERM (a pod being stopped or pre-empted) or an interrupt, save a checkpoint at the end of the
        step and stop."""

        requested = False

        def on_step_end(self, args, state, control, **kwargs):
            requested = self.requested
            if args.world_size > 1:
                # Every process must stop at the same step: the save (ZeRO-3, FSDP) and the next step's gradient
                # reduction wait for all of them. A signal can reach one process a step before another.
                import torch
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    flag = torch.tensor([int(requested)], device=args.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    requested = bool(flag.item())
            if requested:
                self.requested = True
                control.should_save = True
                control.should_training_stop = True
            return control

    return SaveOnTerminate()


class NonFiniteTrainingError(RuntimeError):
    pass


class TrainingOutOfMemory(RuntimeError):
    """The GPU ran out of memory while training; the message says what ran and what to change."""


def out_of_memory_advice(cfg: TrainConfig, fast: FastPath, step: int, checkpoint_dir: Path, err: BaseException) -> str:
    layers = ("off" if not fast.gradient_checkpointing else
              f"on {fast.checkpointed_layers} layers" if fast.checkpointed_layers else "on every layer")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    kept = (f" The checkpoints in {checkpoint_dir} are kept: with resume='auto' a new run continues from the newest."
            if any(checkpoint_dir.glob("checkpoint-*")) else "")
    return (f"the GPU ran out of memory at step {step} ({reason}). It ran {fast.micro_batch} samples per micro-batch "
            f"x {fast.accumulation_steps} per optimizer step, samples up to max_length={cfg.max_length} tokens, "
            f"gradient checkpointing {layers}. To fit, in this order: in JupyterLab, restart this kernel (the failed "
            "step's memory stays held until then) and shut down other kernels or processes on the GPU (`nvidia-smi` "
            "lists them); set "
            "max_memory_gib below what the card has, so that `auto` checkpoints more layers and runs smaller "
            "micro-batches; gradient_checkpointing='on'; a smaller per_device_train_batch_size with a larger "
            "gradient_accumulation_steps (the same samples per step); a smaller max_length; quantization='4bit'."
            + kept)


class TrainingInterrupted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved and `resume="auto"` continues from it."""


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    run_config: dict
    log_history: list[dict]

    def summary(self):
        import pandas as pd

        r = self.run_config["result"]
        keys = ("global_step", "train_loss", "eval_loss_before", "eval_loss_after", "train_runtime_s", "tokens_per_second")
        # A machine other than machine_rank 0 of a several-machine run has only a note (launch.run_launched).
        rows = [("note", r["note"])] if "note" in r else [(k, r.get(k)) for k in keys]
        return pd.DataFrame(rows, columns=["item", "value"], dtype=object).set_index("item")

    def resolved(self):
        import pandas as pd

        r = self.run_config["resolved"]
        keys = ("device", "precision", "gradient_checkpointing", "checkpointed_layers", "micro_batch",
                "accumulation_steps", "padding_free", "shared_prefix", "liger_kernel", "fused_lora",
                "cudnn_attention", "torch_compile", "compile_memory_budget", "attn_implementation", "base_model_path",
                "end_of_turn_token", "train_samples", "eval_samples", "resumed_from")
        rows = [(k, str(r[k])) for k in keys if k in r] + [("output_dir", str(self.output_dir))]
        return pd.DataFrame(rows, columns=["item", "value"], dtype=object).set_index("item")


@dataclasses.dataclass
class TrainerSetup:
    """Everything `train` needs, built by `build_trainer` (benchmarks and tests use it too)."""

    trainer: Any
    fast: FastPath
    train_records: list[dict]
    train_samples: int
    eval_samples: int
    checkpoint_dir: Path
    stop_on_nonfinite: Any
    on_terminate: Any
    # The base model's parameters (a merged model has as many).
    parameter_count: int = 0


def load_training_data(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    data_dir = Path(cfg.data_dir)
    train_path, eval_path = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    if not train_path.is_file():
        raise DataError(f"{train_path} not found: run notebooks/01_prepare_data.ipynb first (or set data_dir)")
    train_records = load_chat_records(train_path, "training data")
    eval_records = load_chat_records(eval_path, "eval data") if eval_path.is_file() else []
    return train_records, eval_records


def sft_config(cfg: TrainConfig, fast: FastPath, checkpoint_dir: Path, do_eval: bool, eval_batch_size: int = 0):
    """TRL's SFTConfig for `cfg` (whose micro-batch may be merged); the held-out loss is computed in batches of
    `eval_batch_size` (the configured per_device_train_batch_size), so that merging does not change it."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=eval_batch_size or cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit or None,
        eval_strategy="steps" if do_eval and cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        eval_on_start=do_eval,
        bf16=fast.precision == "bf16",
        fp16=fast.precision == "fp16",
        activation_checkpointing=fast.gradient_checkpointing,
        padding_free=fast.padding_free,
        # Padded rows waste least when samples of similar length share a batch.
        train_sampling_strategy="random" if fast.padding_free else "group_by_length",
        max_length=None,  # samples are truncated to cfg.max_length when tokenized
        dataset_kwargs={"skip_prepare_dataset": True},
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=fast.device == "cpu",
        # Every LoRA weight takes part in every forward: DDP need not walk the autograd graph each step to find
        # unused ones (transformers' default without checkpointing, which DDP warns costs time every iteration).
        ddp_find_unused_parameters=False,
        deepspeed=cfg.deepspeed_config if cfg.launcher == "deepspeed" and launched() else None,
        report_to="none",
        dataloader_num_workers=0,
    )


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    targets = cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def build_trainer(cfg: TrainConfig, model=None, tokenizer=None, records=None, extra_callbacks=()) -> "TrainerSetup":
    """The project's trainer. `model`, `tokenizer` and `records` (train, eval) replace loading them from
    `cfg` (the benchmark passes a random-weight 7B shape and in-memory data)."""
    from transformers import set_seed

    train_records, eval_records = records if records is not None else load_training_data(cfg)
    set_seed(cfg.seed)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.base_model)
    train_ds = build_dataset(train_records, tokenizer, cfg.max_length, cfg.max_train_samples)
    if train_ds is None:
        source = f"{cfg.data_dir}/train.jsonl" if records is None else "the training records given"
        raise DataError(f"{source}: no sample has an answer within max_length={cfg.max_length} tokens")
    eval_ds = build_dataset(eval_records, tokenizer, cfg.max_length, cfg.max_eval_samples) if eval_records else None

    select_local_gpu()  # first: asking the GPU anything (its bf16 support) would open a context on GPU 0
    device = resolve_device()
    precision = resolve_precision(cfg.precision, device)
    if model is None:
        model = load_model(cfg.base_model, precision, device, cfg.quantization)
    # Asked once, with the model loaded: every plan below is for the memory this process can use.
    held = gpu_memory() if device == "cuda" and not cfg.max_memory_gib else None
    if held and held.elsewhere > GPU_HELD_ELSEWHERE_NOTICE:
        log.warning("%.1f of this GPU's %.1f GiB are held outside this training (another Jupyter kernel or "
                    "process? `nvidia-smi` lists them); `auto` plans for the %.1f GiB left", held.elsewhere / 2**30,
                    held.total / 2**30, held.available / 2**30)
    device_memory = held.available if held else None
    budget = memory_budget(cfg, device, device_memory)
    parameter_count = model.num_parameters()
    longest = longest_sample(train_ds)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # The persona system turn the samples start with. Measured on the first rows: a cap too long for a later
    # batch only makes its step run the prefix twice.
    prefix = shared_prefix_length(train_ds[:1000]["input_ids"], SharedPrefixCollator.min_prefix)
    if prefix < SharedPrefixCollator.min_prefix:
        prefix = 0

    def estimate(batch: int, shared: bool, mlp_kept: int = 4) -> MemoryEstimate | None:
        if shared:
            return estimate_training_memory(model.config, weight_bytes, precision, batch * (longest - prefix), prefix,
                                            mlp_kept)
        return estimate_training_memory(model.config, weight_bytes, precision, batch * longest, 0, mlp_kept)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    def estimate_as_run(batch: int, mlp_kept: int = 4) -> MemoryEstimate | None:
        return estimate(batch, bool(prefix) and wants_shared_prefix(cfg, device, world_size, batch), mlp_kept)

    micro_batch = choose_micro_batch(cfg, device, world_size, estimate_as_run, budget)
    eval_batch_size = cfg.per_device_train_batch_size
    if micro_batch != cfg.per_device_train_batch_size:
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        cfg = dataclasses.replace(cfg, per_device_train_batch_size=micro_batch,
                                  gradient_accumulation_steps=per_step // micro_batch)
    # Compiled, the layers keep fewer of the MLP's tensors, and fewer still at a lower activation memory budget:
    # the least recomputation that fits, before checkpointing whole layers.
    compile_budget, mlp_kept = None, 4
    if cfg.torch_compile:
        compile_budget, mlp_kept = choose_compile_memory_budget(cfg, lambda kept: estimate_as_run(micro_batch, kept),
                                                                budget)
    memory = estimate(micro_batch, False, mlp_kept)
    prefix_memory = estimate(micro_batch, True, mlp_kept) if prefix else None
    fast = choose_fast_path(cfg, device, memory, world_size, device_memory=device_memory,
                            model_type=model.config.model_type, prefix_memory=prefix_memory)
    if model.config._attn_implementation != fast.attn_implementation:
        model.set_attn_implementation(fast.attn_implementation)
    if fast.liger_kernel and not apply_liger_kernels(model):
        fast = dataclasses.replace(fast, liger_kernel=False)
    collator = None
    if fast.shared_prefix:
        collator = SharedPrefixCollator(tokenizer.pad_token_id, max_prefix=prefix)
    checkpoint_dir = Path(cfg.output_dir) / "checkpoints"
    partial = ([_partial_checkpointing_callback(fast.checkpointed_layers)]
               if fast.gradient_checkpointing and fast.checkpointed_layers else [])
    stop_on_nonfinite = _nonfinite_stop_callback()
    on_terminate = _terminate_callback()
    trainer = _sft_trainer_class()(
        model=model,
        args=sft_config(cfg, fast, checkpoint_dir, eval_ds is not None, eval_batch_size),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        data_collator=collator,
        token_metrics=cfg.token_metrics,
        avoid_cudnn_attention=fast.avoids_cudnn_attention,
        # A CPU step's activations live in host memory, allocated and freed thousands of times per step.
        keep_freed_host_memory=device == "cpu",
        callbacks=[stop_on_nonfinite, _progress_log_callback(), on_terminate] + partial + list(extra_callbacks),
    )
    # In a Jupyter kernel the Trainer adds its HTML progress bar, which fails at the end of a training stopped at
    # the step it last drew (an interrupt: `TypeError ... 'int' and 'NoneType'` instead of TrainingInterrupted).
    # The [train] step lines already show progress, with an ETA, in JupyterLab and in papermill's log alike.
    from transformers.utils.notebook import NotebookProgressCallback

    trainer.remove_callback(NotebookProgressCallback)
    # DeepSpeed ZeRO-3 and FSDP hand out parameters through module calls; the fused forward reads them directly.
    if cfg.fused_lora and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        fast = dataclasses.replace(fast, fused_lora=fuse_lora_forwards(trainer.model) > 0)
    if cfg.torch_compile:
        if trainer.is_fsdp_enabled:
            raise ConfigError("TrainConfig.torch_compile: not with FSDP (it gathers each layer's weights in module "
                              "hooks); set it False")
        compiled = compile_decoder_layers(checkpointable_layers(trainer.model), compile_budget) > 0
        fast = dataclasses.replace(fast, torch_compile=compiled,
                                   compile_memory_budget=compile_budget if compiled else None)
    if memory:
        chosen = (fast.checkpointed_layers or memory.layers) if fast.gradient_checkpointing else 0
        planned = prefix_memory if fast.shared_prefix and prefix_memory else memory
        log.info("fast path: %s (estimated peak: %.1f GiB without checkpointing, %.1f GiB with %d of %d layers "
                 "checkpointed)", fast, planned.peak() / 2**30, planned.peak(chosen) / 2**30, chosen, memory.layers)
    else:
        log.info("fast path: %s (peak memory not estimated for this architecture)", fast)
    return TrainerSetup(trainer, fast, train_records, len(train_ds), len(eval_ds) if eval_ds is not None else 0,
                        checkpoint_dir, stop_on_nonfinite, on_terminate, parameter_count)


@releases_gpu_memory
def train(cfg: TrainConfig) -> TrainResult:
    """Train in this process, or — with a launcher — in processes started by accelerate or deepspeed."""
    import torch

    if cfg.launcher != "none" and not launched():
        return run_launched(cfg, resolve_precision(cfg.precision, resolve_device()))
    setup = build_trainer(cfg)
    try:
        trainer, fast, checkpoint_dir = setup.trainer, setup.fast, setup.checkpoint_dir
        stop_on_nonfinite, train_records = setup.stop_on_nonfinite, setup.train_records
        output_dir = Path(cfg.output_dir)
        if trainer.is_world_process_zero():
            set_aside_foreign_checkpoints(cfg, checkpoint_dir)
            # Said before hours of training rather than when notebook 04 cannot save the merge.
            problem = disk_space_problem(output_dir, setup.parameter_count * torch_dtype(fast.precision).itemsize,
                                         "merging this adapter (notebook 04, which saves the merged model in the training precision)")
            if problem:
                log.warning(problem)
        trainer.accelerator.wait_for_everyone()
        resume_from = find_resume_checkpoint(checkpoint_dir, cfg.resume)
        finish_from = None
        if resume_from and cfg.resume == "auto":
            # Trainer would step past a checkpoint that already reached the planned steps (one more each time).
            done, planned = checkpoint_step(resume_from), planned_steps(trainer)
            finished = finished_result(output_dir, done) if done == planned else None
            if finished:
                log.warning("this training already ran to step %d (%s) and its adapter is in %s: nothing to do; "
                            "resume='never' trains again", done, resume_from, output_dir)
                return finished
            if done == planned and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
                # Trained to the end, but the final save never completed (killed, pod stopped): save from the last
                # checkpoint rather than train it all again. DeepSpeed and FSDP restore weights only through train().
                log.warning("this training reached its last step (%d, %s) but its final save did not complete: "
                            "saving the adapter from that checkpoint instead of training again", done, resume_from)
                finish_from = resume_from
            elif done >= planned:
                trainer.accelerator.wait_for_everyone()
                if trainer.is_world_process_zero():
                    set_aside_checkpoints(checkpoint_dir, f"reached step {done}, past the {planned} planned now")
                    atomic_write_json(checkpoint_dir / IDENTITY_FILE, run_identity(cfg))
                trainer.accelerator.wait_for_everyone()
                resume_from = None
        do_eval = setup.eval_samples > 0
        tokenizer = trainer.processing_class
        if torch.cuda.is_available():  # peak_gpu_memory_gib is this training's, not the kernel's lifetime peak
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        if finish_from:
            load_checkpoint_weights(trainer, finish_from)
            # The mean training loss and the speed are measured by train(), which did not finish this time.
            training_loss, runtime = None, None
        else:
            with _sigterm_sets(setup.on_terminate):
                try:
                    training_loss = trainer.train(resume_from_checkpoint=resume_from).training_loss
                except torch.OutOfMemoryError as err:
                    raise TrainingOutOfMemory(out_of_memory_advice(cfg, fast, trainer.state.global_step,
                                                                   checkpoint_dir, err)) from err
            runtime = time.perf_counter() - started
        if stop_on_nonfinite.bad:
            error = (f"training stopped: non-finite value {stop_on_nonfinite.bad}; the last good checkpoint in "
                     f"{checkpoint_dir} is kept. Lower learning_rate, or use precision='fp32' / 'bf16' instead of fp16.")
            # Marks the run failed: merge and upload refuse it (the runner also records it in status.json).
            if trainer.is_world_process_zero():
                atomic_write_json(output_dir / "run_config.json", {"config": cfg.to_dict(), "failed": True, "error": error,
                                                                  "result": {"global_step": trainer.state.global_step}})
            raise NonFiniteTrainingError(error)
        if setup.on_terminate.requested:
            raise TrainingInterrupted(
                f"interrupted (SIGTERM or SIGINT): stopped at step {trainer.state.global_step} after saving {checkpoint_dir}/checkpoint-"
                f"{trainer.state.global_step}; run again with resume='auto' to continue"
            )
        history = trainer.state.log_history
        if do_eval and not any("eval_loss" in h and h.get("step") == trainer.state.global_step for h in history):
            trainer.evaluate()  # the held-out loss after training, unless the last periodic eval already gave it
        history = trainer.state.log_history
        eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]

        eot = end_of_turn_token(tokenizer)
        run_config = {
            "config": cfg.to_dict(),
            "resolved": {
                **dataclasses.asdict(fast),
                "base_model_path": resolve_model_path(cfg.base_model),
                "base_model_hub_id": hub_id(cfg.base_model),
                "quantization": cfg.quantization,
                "end_of_turn_token": eot,
                "system_prompt": train_records[0]["messages"][0]["content"] if train_records[0]["messages"][0]["role"] == "system" else None,
                "train_samples": setup.train_samples,
                "eval_samples": setup.eval_samples,
                "resumed_from": resume_from,
                "versions": _versions(),
            },
            "result": {
                "global_step": trainer.state.global_step,
                "train_loss": training_loss,
                "eval_loss_before": eval_losses[0] if eval_losses else None,
                "eval_loss_after": eval_losses[-1] if len(eval_losses) > 1 else None,
                "train_runtime_s": round(runtime, 1) if runtime is not None else None,
                "tokens_per_second": round(trainer.real_tokens_seen / runtime, 1) if runtime else None,
                "peak_gpu_memory_gib": _peak_gpu_memory_gib(),
            },
        }
        _save_final(trainer, output_dir, cfg, run_config)
        return TrainResult(output_dir, run_config, history)
    finally:
        # Drop the accelerator's references to model, optimizer and DeepSpeed engine, so that a second run in
        # the same Jupyter kernel gets the memory back (accelerate's advice between two trainings).
        setup.trainer.accelerator.free_memory()


def _sigterm_sets(callback):
    """While training, SIGTERM and the first interrupt (SIGINT: Ctrl-C, JupyterLab's Interrupt, the first signal of
    a kernel shutdown) only raise a flag that the callback turns into save-and-stop; a second interrupt stops at
    once."""

    def handler(signum, frame):
        if signum == signal.SIGINT and callback.requested:
            raise KeyboardInterrupt
        callback.requested = True
        again = " (interrupt again to stop at once, without it)" if signum == signal.SIGINT else ""
        print(f"[train] {signal.Signals(signum).name} received: saving a checkpoint at the end of this step{again}",
              flush=True)

    return signals_handled(handler)


def _save_final(trainer, output_dir: Path, cfg: TrainConfig, run_config: dict) -> None:
    """Adapter, tokenizer, trainer state and run config, each moved into place only when complete.

    Every process takes part in saving (ZeRO-3 gathers the weights); only the main process writes files."""
    main = trainer.is_world_process_zero()
    staging = output_dir / ".final.tmp"
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        # Trainer.save_model writes nothing from a sharded FSDP state dict; the adapter needs the full one.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staging))
    if main and not (staging / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"{staging}: saving wrote no adapter_model.safetensors (with FSDP, set fsdp_state_dict_type: "
                           "FULL_STATE_DICT in the accelerate config); the checkpoints in "
                           f"{output_dir / 'checkpoints'} are kept")
    if main:
        adapter_config = staging / "adapter_config.json"
        if adapter_config.is_file():
            # Name the Hub id as the base, so the adapter works anywhere (the embedded model's cache path would not).
            meta = json.loads(adapter_config.read_text())
            meta["base_model_name_or_path"] = hub_id(cfg.base_model)
            adapter_config.write_text(json.dumps(meta, indent=2))
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        give_default_modes(staging)  # safetensors writes 0600
        for item in sorted(staging.iterdir()):
            target = output_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        staging.rmdir()
        atomic_write_json(output_dir / "run_config.json", run_config)
    trainer.accelerator.wait_for_everyone()


def _peak_gpu_memory_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ironman_nb.train", description=__doc__)
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields (or a run_config.json)")
    # The deepspeed launcher appends --local_rank=N (the rank is also in the LOCAL_RANK environment variable).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    data: Any = read_json(ns.config, "training config")
    params = data.get("config", data)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = TrainConfig.from_params(**params)
        result = train(cfg)
    except TrainingInterrupted as err:
        print(f"[train] {err}", file=sys.stderr)
        return 128 + signal.SIGTERM
    launch_id = os.environ.get(LAUNCH_ID_ENV)
    if launch_id and os.environ.get("RANK", "0") == "0":
        # What notebook 02 reads to know this launch finished (a launcher can exit 0 when its workers were killed).
        atomic_write_json(Path(cfg.output_dir) / LAUNCH_DONE_FILE, {"launch_id": launch_id})
    print(json.dumps(result.run_config["result"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
