import json
import math

import pytest

from conftest import write_chat_data
from ironman_nb.config import TrainConfig
from ironman_nb.io import DISK_ADVICE, human_size
from ironman_nb.train import build_trainer, choose_fast_path, find_resume_checkpoint, memory_budget, train


def tiny_cfg(tmp_path, model_dir, **overrides):
    """fp32, so that exact comparisons hold on any CPU (`auto` is bf16 on CPUs with native bf16)."""
    data = write_chat_data(tmp_path / "data")
    params = dict(base_model=str(model_dir), data_dir=str(data), output_dir=str(tmp_path / "adapter"),
                  max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
                  logging_steps=1, save_steps=2, eval_steps=2, max_length=512, seed=7, precision="fp32")
    params.update(overrides)
    return TrainConfig(**params)


def full_logits_loss(model, batch):
    """The plain reference: every position's logits, mean cross-entropy over labelled next tokens."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs, use_cache=False).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


BATCH_MODES = {
    "packed": dict(padding_free="on", shared_prefix="off"),
    "padded": dict(padding_free="off", shared_prefix="off"),
    "shared prefix": dict(padding_free="off", shared_prefix="on"),
}


@pytest.mark.parametrize("mode", BATCH_MODES)
def test_fast_loss_equals_full_logits_loss(tmp_path, tiny_model_dir, mode):
    """Every batch layout gives the plain full-logits loss of the same samples, and the same gradients."""
    import torch

    setup = build_trainer(tiny_cfg(tmp_path, tiny_model_dir, **BATCH_MODES[mode]))
    trainer = setup.trainer
    samples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(samples)
    assert ("prefix_ids" in batch) == (mode == "shared prefix")
    assert ("attention_mask" in batch) == (mode != "packed")
    trainer.model.eval()
    ours = trainer.compute_loss(trainer.model, dict(batch))
    ours.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    plain = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(samples)
    reference = full_logits_loss(trainer.model, plain)
    reference.backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert grads and all(torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-7)
                         for n, p in trainer.model.named_parameters() if p.grad is not None)


def _gradients_before_step():
    """A callback that records the gradients the optimizer is about to apply, step by step (set `.model`)."""
    from transformers import TrainerCallback

    class GradientsBeforeStep(TrainerCallback):
        def __init__(self):
            self.model, self.steps = None, []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.steps.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    return GradientsBeforeStep()


def _train_capturing_gradients(cfg):
    """(setup, gradients the optimizer was about to apply, one dict per step) of a training run of `cfg`."""
    capture = _gradients_before_step()
    setup = build_trainer(cfg, extra_callbacks=[capture])
    capture.model = setup.trainer.model
    setup.trainer.train()
    return setup, capture.steps


def _assert_same_gradients(expected_steps, actual_steps, rtol=1e-4, atol=1e-6):
    import torch

    assert len(expected_steps) == len(actual_steps) and expected_steps
    for expected, actual in zip(expected_steps, actual_steps):
        assert expected.keys() == actual.keys() and expected
        for name in expected:
            assert torch.allclose(expected[name], actual[name], rtol=rtol, atol=atol), name


def test_one_prefix_pass_per_optimizer_step_gives_the_plain_gradients(tmp_path, tiny_model_dir):
    """With gradient accumulation, the shared prefix runs once per optimizer step (not per micro-batch), and
    the gradients the optimizer sees equal those of plain padded rows."""
    grads = {}
    for mode in ("padded", "shared prefix"):
        setup, grads[mode] = _train_capturing_gradients(tiny_cfg(
            tmp_path / mode, tiny_model_dir, max_steps=2, gradient_accumulation_steps=3, eval_steps=0, save_steps=100,
            **BATCH_MODES[mode]))
    assert setup.trainer.prefix_passes == 2  # 2 steps x 3 micro-batches, one prefix pass per step
    assert len(grads["padded"]) == 2
    _assert_same_gradients(grads["padded"], grads["shared prefix"])


@pytest.mark.parametrize("checkpointed", [None, 1])
def test_shared_prefix_with_checkpointing_gives_the_plain_gradients(tmp_path, tiny_model_dir, monkeypatch, checkpointed):
    """The shared prefix under gradient checkpointing (every layer: None; layer 0 of 2: 1): a checkpointed
    layer's recompute reads the same prefix keys/values (the cache is read-only), the prefix pass itself is not
    checkpointed, and the optimizer sees the gradients of plain padded rows; afterwards the layers' flags are
    as they were."""
    import dataclasses

    import ironman_nb.train as train_module

    choose = train_module.choose_fast_path
    grads = {}
    for mode in ("padded", "shared prefix"):
        if mode == "shared prefix":
            monkeypatch.setattr(train_module, "choose_fast_path", lambda *a, **k: dataclasses.replace(
                choose(*a, **k), gradient_checkpointing=True, checkpointed_layers=checkpointed))
        setup, grads[mode] = _train_capturing_gradients(tiny_cfg(
            tmp_path / mode, tiny_model_dir, max_steps=2, gradient_accumulation_steps=2, eval_steps=0, save_steps=100,
            **BATCH_MODES[mode]))
    trainer = setup.trainer
    assert trainer.args.activation_checkpointing and trainer.prefix_passes == 2
    layers = trainer.model.base_model.model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == ([True, False] if checkpointed else [True, True])
    assert not any("_can_checkpoint_with_cache" in vars(layer) for layer in layers)
    assert len(grads["padded"]) == 2
    _assert_same_gradients(grads["padded"], grads["shared prefix"])


def test_merged_micro_batches_give_the_same_gradients(tmp_path, tiny_model_dir, monkeypatch):
    """merge_micro_batches: 2 x 2 samples per step run as one micro-batch of 4 (what choose_micro_batch picks on
    a GPU with room) train on the same samples with the same gradients, and the run reports the split."""
    import ironman_nb.train as train_module

    grads, splits = {}, {}
    for merged in (False, True):
        if merged:
            monkeypatch.setattr(train_module, "choose_micro_batch", lambda cfg, *a, **k: 4)
        setup, grads[merged] = _train_capturing_gradients(tiny_cfg(
            tmp_path / str(merged), tiny_model_dir, max_steps=2, eval_steps=0, save_steps=100, **BATCH_MODES["padded"]))
        args = setup.trainer.args
        splits[merged] = (args.per_device_train_batch_size, args.gradient_accumulation_steps,
                          setup.fast.micro_batch, setup.fast.accumulation_steps, args.per_device_eval_batch_size)
    # The held-out loss (a mean over batches of the batches' means) keeps the configured batch size.
    assert splits == {False: (2, 2, 2, 2, 2), True: (4, 1, 4, 1, 2)}
    _assert_same_gradients(grads[False], grads[True])


@pytest.mark.parametrize("mode", ["shared prefix", "packed"])
def test_compiled_layers_give_the_eager_gradients(tmp_path, tiny_model_dir, monkeypatch, caplog, mode):
    """torch_compile: the decoder layers' norms, MLP and attention projections run compiled (the attention
    forward eager), and the optimizer sees the eager run's gradients — with the shared prefix under partial
    checkpointing (layer 0 of 2), and with packed rows; the parameter names (the adapter's keys) stay, and no
    function falls back to eager for having compiled too many variants."""
    import dataclasses
    import logging

    import ironman_nb.train as train_module

    choose = train_module.choose_fast_path
    monkeypatch.setattr(train_module, "choose_fast_path", lambda *a, **k: dataclasses.replace(
        choose(*a, **k), gradient_checkpointing=mode == "shared prefix", checkpointed_layers=1))
    # Packed rows: the least activation memory budget (the backward recomputes the MLP's products).
    least = train_module.COMPILE_MEMORY_BUDGETS[-1]
    if mode == "packed":
        monkeypatch.setattr(train_module, "choose_compile_memory_budget", lambda *a, **k: least)
    grads, setups = {}, {}
    for compiled in (False, True):
        setups[compiled], grads[compiled] = _train_capturing_gradients(tiny_cfg(
            tmp_path / str(compiled), tiny_model_dir, max_steps=2, eval_steps=0, save_steps=100,
            torch_compile=compiled, **BATCH_MODES[mode]))
    assert not setups[False].fast.torch_compile and setups[True].fast.torch_compile
    assert setups[True].fast.compile_memory_budget == (least[0] if mode == "packed" else 1.0)
    layer = setups[True].trainer.model.base_model.model.model.layers[0]
    compiled = [name for name, module in layer.named_modules() if module._compiled_call_impl is not None]
    assert sorted(compiled) == ["input_layernorm", "mlp", "post_attention_layernorm", "self_attn.k_proj",
                                "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    _assert_same_gradients(grads[False], grads[True], rtol=1e-4, atol=1e-6)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage() and r.levelno >= logging.WARNING]


def test_collator_prefix_is_capped_to_the_training_sets_common_prefix():
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100] * 6 + [11]},
            {"input_ids": [5, 6, 7, 8, 9, 12, 13], "labels": [-100] * 6 + [13]}]
    from ironman_nb.train import SharedPrefixCollator

    assert SharedPrefixCollator(pad_token_id=0, min_prefix=1)(rows)["prefix_ids"].tolist() == [5, 6, 7, 8, 9]
    capped = SharedPrefixCollator(pad_token_id=0, min_prefix=1, max_prefix=3)(rows)
    assert capped["prefix_ids"].tolist() == [5, 6, 7]
    assert capped["input_ids"].tolist() == [[8, 9, 10, 11], [8, 9, 12, 13]]


def _loss_and_lora_grads(trainer, batch):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _unfuse(model):
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear and "forward" in vars(module):
            del module.forward  # back to PEFT's class forward


def _producing_node(output) -> str:
    """The autograd node behind a LoRA layer's output (below the reshape back to the input's shape)."""
    return type(output.grad_fn.next_functions[0][0]).__name__


def test_fused_lora_forward_gives_pefts_loss_and_gradients(tmp_path, tiny_model_dir):
    import torch

    setup = build_trainer(tiny_cfg(tmp_path, tiny_model_dir, lora_dropout=0.1))
    trainer = setup.trainer
    assert setup.fast.fused_lora
    trainer.model.eval()  # dropout off, so both forwards see the same inputs
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapter something to add
            torch.nn.init.normal_(param, std=0.02)
    fused_loss, fused_grads = _loss_and_lora_grads(trainer, batch)
    # fp32 outside autocast: each LoRA layer is one autograd node (forward and backward of base and adapter).
    q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert _producing_node(q_proj(torch.randn(2, 3, q_proj.in_features))) == "LoRALinearBackward"
    _unfuse(trainer.model)
    peft_loss, peft_grads = _loss_and_lora_grads(trainer, batch)
    assert fused_loss == pytest.approx(peft_loss, rel=1e-6)
    assert fused_grads.keys() == peft_grads.keys() and len(fused_grads) > 10
    for name in peft_grads:
        assert torch.allclose(fused_grads[name], peft_grads[name], rtol=1e-4, atol=1e-7), name


def test_fused_lora_forward_under_bf16_autocast_and_fallbacks(tiny_model_dir):
    """As on a GPU: a bf16 base with fp32 adapters under autocast; and PEFT's forward where adapters are off."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ironman_nb.config import TrainConfig
    from ironman_nb.train import fuse_lora_forwards, lora_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, lora_config(TrainConfig()))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    ids = torch.randint(0, 1000, (2, 24))

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits.float()
        logits.logsumexp(-1).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    peft_logits, peft_grads = run()
    assert fuse_lora_forwards(model) == 14  # 2 layers x q, k, v, o, gate, up, down
    fused_logits, fused_grads = run()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: the base's product, then one addmm
        assert _producing_node(q_proj(torch.randn(2, 3, q_proj.in_features))) == "AddmmBackward0"
    assert torch.allclose(fused_logits, peft_logits, atol=0.05, rtol=0.02)
    for name in peft_grads:
        assert fused_grads[name].dtype == torch.float32
        assert torch.allclose(fused_grads[name], peft_grads[name], atol=1e-3, rtol=0.05), name
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)  # no LoRA layers at all
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, plain(input_ids=ids, use_cache=False).logits)


def _small_qwen2_lora(hidden: int, intermediate: int, layers: int):
    """A random-weight Qwen2-shaped model in bf16 with the project's LoRA adapters (fp32, as on a GPU)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from ironman_nb.train import lora_config

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), lora_config(TrainConfig()))


def _saved_activation_bytes(model, ids) -> int:
    """Bytes one forward under bf16 autocast keeps for the backward (saved-tensor hooks), parameters not counted."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return sum(kept.values())


def test_fused_lora_forward_keeps_fewer_activations_for_the_backward():
    """Under bf16 autocast with fp32 adapters (a GPU run), PEFT's forward keeps a bf16 copy of each LoRA layer's
    input for the backward; the fused forward keeps the input itself, shared by q/k/v and by gate/up."""
    import torch

    from ironman_nb.train import fuse_lora_forwards

    def kept_bytes(fused: bool) -> int:
        model = _small_qwen2_lora(64, 256, 1)
        if fused:
            fuse_lora_forwards(model)
        return _saved_activation_bytes(model, torch.randint(0, 128, (2, 32)))

    peft, fused = kept_bytes(False), kept_bytes(True)
    assert fused <= 0.92 * peft, (fused, peft)


def test_shared_prefix_stops_before_the_first_answer_token(tokenizer):
    import torch

    from ironman_nb.train import SharedPrefixCollator

    rows = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, -100, 9, 10]},
            {"input_ids": [5, 6, 7, 8, 11], "labels": [-100, -100, -100, -100, 11]}]
    batch = SharedPrefixCollator(pad_token_id=0, min_prefix=1)(rows)
    assert batch["prefix_ids"].tolist() == [5, 6, 7]  # token 8 predicts the first answer token, so it stays
    assert batch["input_ids"].tolist() == [[8, 9, 10], [8, 11, 0]]
    assert batch["labels"].tolist() == [[-100, 9, 10], [-100, 11, -100]]
    # The positions whose next token is an answer token (row · width + column), found without the model's inputs.
    assert batch["answer_index"].tolist() == [0, 1, 3]
    unshared = SharedPrefixCollator(pad_token_id=0)(rows)
    assert "prefix_ids" not in unshared  # shorter than min_prefix
    targets = torch.nn.functional.pad(unshared["labels"][:, 1:], (0, 1), value=-100)
    assert unshared["answer_index"].tolist() == (targets != -100).flatten().nonzero().squeeze(1).tolist() == [3, 4, 9]


def test_packed_samples_stay_isolated(tmp_path, tiny_model_dir):
    """A sample's loss is the same alone and packed with others (attention stays inside each sample)."""
    import torch

    setup = build_trainer(tiny_cfg(tmp_path, tiny_model_dir, padding_free="on", shared_prefix="off"))
    trainer = setup.trainer
    trainer.model.eval()
    samples = [trainer.train_dataset[i] for i in range(3)]

    def summed_loss(batch):
        count = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, dict(batch)).item() * count

    packed = summed_loss(trainer.data_collator(samples))
    alone = sum(summed_loss(trainer.data_collator([s])) for s in samples)
    assert packed == pytest.approx(alone, rel=1e-5)


def test_cpu_fast_path(monkeypatch):
    import ironman_nb.models as models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    fast = choose_fast_path(TrainConfig(), "cpu", model_type="llama")
    assert (fast.precision, fast.gradient_checkpointing, fast.shared_prefix, fast.padding_free, fast.attn_implementation) == (
        "fp32", False, True, False, "sdpa")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    native = choose_fast_path(TrainConfig(), "cpu", model_type="llama")
    assert (native.precision, native.shared_prefix, native.attn_implementation) == ("bf16", True, "grouped_matmul")
    assert choose_fast_path(TrainConfig(precision="fp32"), "cpu", model_type="llama").attn_implementation == "sdpa"
    packed = choose_fast_path(TrainConfig(per_device_train_batch_size=1), "cpu")
    assert (packed.shared_prefix, packed.padding_free) == (False, True)
    # LoRA dropout: one prefix pass would draw one dropout mask for every sample of the step.
    assert choose_fast_path(TrainConfig(lora_dropout=0.05), "cpu").shared_prefix is False
    assert choose_fast_path(TrainConfig(lora_dropout=0.05, shared_prefix="on"), "cpu").shared_prefix is True
    forced = choose_fast_path(TrainConfig(precision="bf16", gradient_checkpointing="on", padding_free="off"), "cpu")
    # The shared prefix stays under checkpointing (its cache is read-only: a recompute sees the same prefix).
    assert (forced.precision, forced.gradient_checkpointing, forced.shared_prefix, forced.padding_free) == ("bf16", True, True, False)
    from ironman_nb.config import ConfigError

    with pytest.raises(ConfigError, match="shared_prefix"):
        choose_fast_path(TrainConfig(shared_prefix="on", padding_free="on"), "cpu")


def test_per_micro_batch_bookkeeping_walks_the_modules_once(tmp_path, tiny_model_dir, monkeypatch):
    """Trainer's FLOP count and the unwrapped model are what transformers / accelerate give, each looked up once
    (both walk every module — thousands in a LoRA model — which a GPU step would otherwise wait on)."""
    import torch
    from transformers import Trainer

    trainer = build_trainer(tiny_cfg(tmp_path, tiny_model_dir)).trainer
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    expected = Trainer.floating_point_ops(trainer, batch)
    counts = []
    count_parameters = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda *a, **k: counts.append("parameters") or count_parameters(*a, **k))
    assert [trainer.floating_point_ops(batch) for _ in range(3)] == [expected] * 3 and expected > 0
    unwrap = trainer.accelerator.unwrap_model
    monkeypatch.setattr(trainer.accelerator, "unwrap_model", lambda m, *a, **k: counts.append("unwrap") or unwrap(m, *a, **k))
    assert [trainer._inner_model(model) for _ in range(3)] == [unwrap(model)] * 3
    wrapper = torch.nn.Sequential(model)  # another model object: looked up again
    assert trainer._inner_model(wrapper) is unwrap(wrapper)
    assert counts == ["parameters", "unwrap", "unwrap"]


@pytest.mark.parametrize("token_metrics", [False, True])
def test_token_metrics_only_when_asked(tmp_path, tiny_model_dir, token_metrics):
    """Entropy and top-1 accuracy at the answer positions are logged only with token_metrics=True, and then
    equal what the full logits give."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer = build_trainer(tiny_cfg(tmp_path, tiny_model_dir, token_metrics=token_metrics)).trainer
    samples = [trainer.train_dataset[i] for i in range(3)]
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(trainer.data_collator(samples)))
    logged = dict(trainer._metrics["train"])
    if not token_metrics:
        assert "entropy" not in logged and "mean_token_accuracy" not in logged
        return
    plain = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(samples)
    with torch.no_grad():
        logits = trainer.model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"],
                               use_cache=False).logits[:, :-1].float()
    targets = plain["labels"][:, 1:]
    valid = targets != -100
    log_probs = logits[valid].log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean().item()
    accuracy = (logits[valid].argmax(-1) == targets[valid]).float().mean().item()
    assert logged["entropy"] == [pytest.approx(entropy, rel=1e-5)]
    assert logged["mean_token_accuracy"] == [pytest.approx(accuracy, abs=1e-6)]


@pytest.mark.parametrize("mode", BATCH_MODES)
def test_lm_head_runs_only_on_answer_rows(tmp_path, tiny_model_dir, mode):
    """The LM head sees one row per answer token, not every position that is an answer in some sample, and
    none in the shared prefix's pass."""
    trainer = build_trainer(tiny_cfg(tmp_path, tiny_model_dir, **BATCH_MODES[mode])).trainer
    samples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(samples)
    targets = batch["labels"][:, 1:] != -100
    head_rows = []
    head = trainer.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: head_rows.append(output.shape[:-1].numel()))
    try:
        trainer.compute_loss(trainer.model, dict(batch))
    finally:
        handle.remove()
    answers = int(targets.sum())
    prefix_pass = [0] if mode == "shared prefix" else []  # the prefix pass computes no logits at all
    assert head_rows == prefix_pass + [answers]
    if mode != "packed":  # padded rows: the union of answer columns has more rows, or the test shows nothing
        assert targets.any(dim=0).sum() * len(samples) > answers


def _record_loss_logits_dtypes(monkeypatch) -> list:
    """The dtype of the logits each call of the project's loss receives, in order."""
    import ironman_nb.loss

    seen = []
    original = ironman_nb.loss.summed_cross_entropy

    def recording(logits, targets, rows=None):
        seen.append(logits.dtype)
        return original(logits, targets, rows)

    monkeypatch.setattr(ironman_nb.loss, "summed_cross_entropy", recording)
    return seen


def test_mixed_precision_logits_stay_bf16(tmp_path, tiny_model_dir, monkeypatch):
    """Under bf16 mixed precision the loss gets the model's bf16 logits, not accelerate's fp32 copy of them."""
    import torch

    seen = _record_loss_logits_dtypes(monkeypatch)
    setup = build_trainer(tiny_cfg(tmp_path, tiny_model_dir, precision="bf16", max_steps=1, eval_steps=0))
    assert setup.trainer.args.bf16  # accelerate's mixed precision, which casts outputs to fp32
    autocast = []
    setup.trainer.model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: autocast.append(torch.is_autocast_enabled("cpu")))
    setup.trainer.train()
    assert seen and set(seen) == {torch.bfloat16}
    assert autocast and all(autocast)  # the cast is gone, autocast is not


def test_mixed_precision_logits_stay_bf16_inside_ddp(tmp_path, tiny_model_dir, monkeypatch):
    """Accelerate casts outputs to fp32 on the model *inside* DDP (it wraps after patching forward): the trainer
    undoes it there too, so several processes train on bf16 logits as well. (One gloo process here.)"""
    import socket

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    seen = _record_loss_logits_dtypes(monkeypatch)
    trainer = build_trainer(tiny_cfg(tmp_path, tiny_model_dir, precision="bf16", eval_steps=0)).trainer
    model = trainer.accelerator.prepare_model(trainer.model)  # one process: accelerate patches forward, no DDP
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        trainer.compute_loss(wrapped, dict(batch)).backward()
    finally:
        dist.destroy_process_group()
    assert seen == [torch.bfloat16]


def test_cuda_fast_path():
    """On a GPU: padded rows, no checkpointing while memory allows, Liger when installed; the shared prefix
    from 8 samples per micro-batch (at 4 it measured slower there); the 4-bit profile checkpoints and keeps
    Liger off."""
    fast = choose_fast_path(TrainConfig(precision="bf16"), "cuda")
    assert (fast.gradient_checkpointing, fast.shared_prefix, fast.padding_free, fast.liger_kernel) == (False, False, False, True)
    large = choose_fast_path(TrainConfig(precision="bf16", per_device_train_batch_size=8), "cuda")
    assert (large.shared_prefix, large.padding_free) == (True, False)
    qlora = choose_fast_path(TrainConfig(precision="bf16", quantization="4bit"), "cuda")
    assert (qlora.gradient_checkpointing, qlora.liger_kernel) == (True, False)


def test_training_on_cuda_keeps_sdpa_off_cudnn_unless_asked(tmp_path, tiny_model_dir, monkeypatch):
    """On CUDA with sdpa, training runs with cuDNN's attention kernels disabled (their CPU cost per call exceeds
    their GPU time in a LoRA step) — the whole loop, so checkpointed recomputes use the forward's kernels; the
    other backends stay, and the flags are restored afterwards. `cudnn_attention = True` leaves torch's choice."""
    import torch
    from transformers import Trainer

    assert choose_fast_path(TrainConfig(precision="bf16"), "cuda").avoids_cudnn_attention
    assert not choose_fast_path(TrainConfig(precision="bf16", cudnn_attention=True), "cuda").avoids_cudnn_attention
    assert not choose_fast_path(TrainConfig(), "cpu").avoids_cudnn_attention

    def flags():
        cuda = torch.backends.cuda
        return (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
                cuda.math_sdp_enabled())

    seen = []
    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: seen.append(flags()))
    trainer = build_trainer(tiny_cfg(tmp_path, tiny_model_dir)).trainer
    assert not trainer.avoid_cudnn_attention  # a CPU run
    before = flags()
    trainer.train()
    trainer.avoid_cudnn_attention = True
    trainer.train()
    assert seen == [before, (False, True, True, True)] and flags() == before and before[0]


def test_training_on_a_cpu_keeps_freed_host_memory_for_reuse(tmp_path, tiny_model_dir, monkeypatch):
    """A CPU run's whole training loop runs inside models.keep_freed_memory (its activations are host memory,
    allocated and freed thousands of times a step); a GPU run's does not."""
    import contextlib

    from transformers import Trainer

    import ironman_nb.train as train_module

    states, inside = [], []

    @contextlib.contextmanager
    def recorded(active=True):
        states.append(active)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(train_module, "keep_freed_memory", recorded)
    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: states.append(("inside", list(inside))))
    trainer = build_trainer(tiny_cfg(tmp_path, tiny_model_dir)).trainer
    trainer.train()
    trainer.keep_freed_host_memory = False  # as a CUDA run sets it
    trainer.train()
    assert states == [True, ("inside", [True]), False, ("inside", [True])]


def test_torch_compile_leaves_liger_off_and_refuses_what_it_cannot_compile():
    """Compiling fuses the norms and MLP that Liger would replace: `auto` leaves Liger off, `on` is refused; so are
    the runs whose layers are not plain modules (ZeRO-3's gathered weights, bitsandbytes' 4-bit layers)."""
    from ironman_nb.config import ConfigError

    assert choose_fast_path(TrainConfig(precision="bf16", torch_compile=True), "cuda").liger_kernel is False
    with pytest.raises(ConfigError, match="liger_kernel.*torch_compile"):
        choose_fast_path(TrainConfig(precision="bf16", torch_compile=True, liger_kernel="on"), "cuda")
    with pytest.raises(ConfigError, match="torch_compile.*deepspeed"):
        TrainConfig(torch_compile=True, launcher="deepspeed")
    with pytest.raises(ConfigError, match="torch_compile.*unquantized"):
        TrainConfig(torch_compile=True, quantization="4bit")


@pytest.mark.parametrize("budget_gib, expected", [(72, (1.0, 4)), (45, (0.5, 2)), (35, (0.2, 0)), (23.7, (1.0, 4))])
def test_compiled_runs_recompute_the_mlp_before_checkpointing_layers(budget_gib, expected):
    """torch_compile on a GPU: the least recomputation (activation memory budget) whose estimate fits without
    checkpointing — Qwen2-7B, the step's 16 samples with the shared prefix; where none fits (23.7 GiB), the
    default, and checkpointing takes over. Without a budget or with a fixed checkpointing choice: the default."""
    from ironman_nb.train import COMPILE_MEMORY_BUDGETS, choose_compile_memory_budget

    longest, prefix = 549, 244

    def estimate(kept):
        return _qwen2_7b_memory(16 * (longest - prefix), prefix, kept)

    cfg, budget = TrainConfig(precision="bf16", torch_compile=True), budget_gib * 2**30
    assert choose_compile_memory_budget(cfg, estimate, budget) == expected
    index = COMPILE_MEMORY_BUDGETS.index(expected)
    if budget_gib != 23.7:  # it fits, and the choice before it (less recomputation) would not
        assert estimate(expected[1]).peak() <= budget
        assert index == 0 or estimate(COMPILE_MEMORY_BUDGETS[index - 1][1]).peak() > budget
    else:
        assert all(estimate(kept).peak() > budget for _, kept in COMPILE_MEMORY_BUDGETS)
    assert choose_compile_memory_budget(cfg, estimate, 0.0) == (1.0, 4)
    fixed = TrainConfig(precision="bf16", torch_compile=True, gradient_checkpointing="off")
    assert choose_compile_memory_budget(fixed, estimate, 35 * 2**30) == (1.0, 4)


@pytest.mark.parametrize("activation_budget", [1.0, 0.2])
def test_compiled_layers_keep_the_mlp_tensors_the_estimate_counts(activation_budget):
    """What a compiled layer keeps for the backward per token (saved-tensor hooks, bf16 autocast as on a GPU):
    at most the intermediate-sized MLP tensors that COMPILE_MEMORY_BUDGETS counts for its budget (and ~9
    hidden-sized ones; the estimate counts 17), at the lowest budget none; at the default, more than one."""
    import torch

    from ironman_nb.train import (COMPILE_MEMORY_BUDGETS, checkpointable_layers, compile_decoder_layers,
                                  fuse_lora_forwards)

    kept = dict(COMPILE_MEMORY_BUDGETS)[activation_budget]
    hidden, intermediate, layers = 128, 704, 2  # Qwen2's ratio of the two
    model = _small_qwen2_lora(hidden, intermediate, layers)
    fuse_lora_forwards(model)
    compile_decoder_layers(checkpointable_layers(model), activation_budget)
    for length in (30, 31, 32):  # the first shapes compile (the second makes the length dynamic)
        ids = torch.randint(0, 128, (2, length))
        kept_bytes = _saved_activation_bytes(model, ids)
    per_token_layer = kept_bytes / 2 / (ids.numel() * layers)  # bf16 elements
    assert per_token_layer <= kept * intermediate + 10 * hidden, per_token_layer
    assert kept == 0 or per_token_layer > 2 * intermediate, per_token_layer  # the default keeps MLP tensors


def _qwen2_7b_memory(tokens, prefix_tokens=0, mlp_kept=4):
    from transformers import AutoConfig

    from ironman_nb.bench import SHAPES
    from ironman_nb.train import estimate_training_memory

    shape = dict(SHAPES["qwen2-7b"])
    return estimate_training_memory(AutoConfig.for_model(shape.pop("model_type"), **shape), 2 * 7_615_616_512, "bf16",
                                    tokens, prefix_tokens, mlp_kept)


H100, L40S, A100_40GB = 85_520_000_000, 47_700_000_000, 42_410_000_000  # total_memory as CUDA reports it


def test_checkpointing_turns_on_when_the_longest_batch_would_not_fit():
    """`auto` checkpoints from the estimated peak of the longest batch, not from the weights alone: the same
    7B model trains without it on an 80 GB card at batch 4 x 1,024 tokens, with it at 8 x 1,024 or on 48 GB."""
    need = {batch: _qwen2_7b_memory(batch * 1024) for batch in (4, 8)}
    bf16 = TrainConfig(precision="bf16")
    assert not choose_fast_path(bf16, "cuda", need[4], device_memory=H100).gradient_checkpointing
    assert choose_fast_path(bf16, "cuda", need[8], device_memory=H100).gradient_checkpointing
    assert choose_fast_path(bf16, "cuda", need[4], device_memory=L40S).gradient_checkpointing
    assert not choose_fast_path(TrainConfig(precision="bf16", gradient_checkpointing="off"), "cuda", need[8],
                                device_memory=H100).gradient_checkpointing
    forced = choose_fast_path(TrainConfig(precision="bf16", gradient_checkpointing="on"), "cuda", need[4],
                              device_memory=H100)
    assert (forced.gradient_checkpointing, forced.checkpointed_layers) == (True, None)  # None: every layer
    # The one measured point (scripts/perf/README.md): 30.8 GiB peak for batches of 4 samples of ~507 tokens (638 at most).
    measured = 30.8 * 2**30
    assert measured <= _qwen2_7b_memory(4 * 638).peak() <= 1.25 * measured


@pytest.mark.parametrize("batch, card", [(8, H100), (4, L40S), (4, A100_40GB), (16, H100)])
def test_auto_checkpoints_only_as_many_layers_as_the_card_needs(batch, card):
    """Where the batch does not fit, `auto` checkpoints the fewest layers that fit: the estimate with them stays
    within 90 % of the card, with one layer fewer it would not."""
    memory = _qwen2_7b_memory(batch * 1024)
    fast = choose_fast_path(TrainConfig(precision="bf16"), "cuda", memory, device_memory=card)
    assert fast.gradient_checkpointing
    count = fast.checkpointed_layers or memory.layers
    assert memory.peak(count) <= 0.9 * card or count == memory.layers  # nothing fits: all, the most it can do
    assert memory.peak(count - 1) > 0.9 * card
    # Partial checkpointing is the point: on these cards it recomputes fewer layers than all of them.
    if (batch, card) in ((8, H100), (4, L40S), (4, A100_40GB)):
        assert 0 < fast.checkpointed_layers < memory.layers


def test_max_memory_gib_sets_the_budget_on_any_device():
    """`max_memory_gib` replaces 90 % of the card as the budget `auto` plans for, also on a CPU (where it
    otherwise never checkpoints); the shared prefix stays with checkpointing on."""
    from ironman_nb.config import ConfigError

    memory = _qwen2_7b_memory(4 * 1024)
    assert not choose_fast_path(TrainConfig(precision="bf16"), "cuda", memory, device_memory=H100).gradient_checkpointing
    capped = choose_fast_path(TrainConfig(precision="bf16", max_memory_gib=40), "cuda", memory, device_memory=H100)
    assert capped.gradient_checkpointing and 0 < capped.checkpointed_layers < memory.layers
    assert memory.peak(capped.checkpointed_layers) <= 40 * 2**30
    on_cpu = choose_fast_path(TrainConfig(precision="bf16", max_memory_gib=40), "cpu", memory, model_type="qwen2")
    assert (on_cpu.gradient_checkpointing, on_cpu.shared_prefix) == (True, True)
    roomy = choose_fast_path(TrainConfig(precision="bf16", max_memory_gib=60), "cpu", memory, model_type="qwen2")
    assert (roomy.gradient_checkpointing, roomy.shared_prefix) == (False, True)
    with pytest.raises(ConfigError, match="max_memory_gib"):
        TrainConfig(max_memory_gib=-1)


def test_auto_plans_for_the_gpu_memory_other_processes_leave(monkeypatch):
    """Another Jupyter kernel holding a model on the card: `auto` plans for what is left (free memory plus
    what this process holds), where planning for the whole card would run out of memory."""
    import torch

    GiB = 2**30
    held_by_this_process = 16 * GiB  # the loaded base model
    memory = _qwen2_7b_memory(4 * 1024)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: held_by_this_process)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (H100 - held_by_this_process - GiB, H100))
    alone = choose_fast_path(TrainConfig(precision="bf16"), "cuda", memory)
    assert not alone.gradient_checkpointing  # as with the whole card (test above)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (H100 - held_by_this_process - 40 * GiB, H100))
    assert memory_budget(TrainConfig(), "cuda") == pytest.approx(0.9 * (H100 - 40 * GiB))
    shared = choose_fast_path(TrainConfig(precision="bf16"), "cuda", memory)
    assert shared.gradient_checkpointing and memory.peak(shared.checkpointed_layers) <= 0.9 * (H100 - 40 * GiB)
    assert memory_budget(TrainConfig(max_memory_gib=60), "cuda") == 60 * GiB  # set by hand: taken as given


def test_each_launched_process_selects_its_gpu_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    import ironman_nb.train as train_module

    calls = []
    monkeypatch.setattr(train_module, "select_local_gpu", lambda: calls.append("select_local_gpu"))

    def load_model(*args, **kwargs):
        calls.append("load_model")
        raise RuntimeError("stop here")

    monkeypatch.setattr(train_module, "load_model", load_model)
    with pytest.raises(RuntimeError, match="stop here"):
        build_trainer(tiny_cfg(tmp_path, tiny_model_dir))
    assert calls == ["select_local_gpu", "load_model"]


def test_shared_prefix_plans_memory_for_the_suffixes_it_holds():
    """With the shared prefix a batch holds one prefix (its activations, not checkpointed) and its samples'
    suffixes: `auto` plans with that, so a budget the whole samples would overflow keeps the prefix and skips
    checkpointing; where even that does not fit, it checkpoints the fewest layers that fit and keeps the prefix."""
    prefix = 244  # the persona system turn, in tokens of the embedded tokenizer
    memory, prefix_memory = _qwen2_7b_memory(4 * 1024), _qwen2_7b_memory(4 * (1024 - prefix), prefix)
    assert prefix_memory.fixed == _qwen2_7b_memory(prefix).layer_activations * 28
    budget = 42
    assert prefix_memory.peak() <= budget * 2**30 < memory.peak()  # else the test shows nothing
    for device in ("cpu", "cuda"):
        shared = "auto" if device == "cpu" else "on"  # auto on a GPU: from 8 samples per micro-batch
        cfg = TrainConfig(precision="bf16", max_memory_gib=budget, shared_prefix=shared)
        fast = choose_fast_path(cfg, device, memory, model_type="qwen2", prefix_memory=prefix_memory)
        assert (fast.shared_prefix, fast.gradient_checkpointing, fast.padding_free) == (True, False, False)
    for device in ("cpu", "cuda"):
        tight = TrainConfig(precision="bf16", max_memory_gib=20, shared_prefix="on")
        fast = choose_fast_path(tight, device, memory, model_type="qwen2", prefix_memory=prefix_memory)
        count = fast.checkpointed_layers
        assert fast.shared_prefix and fast.gradient_checkpointing and 0 < count < 28
        assert prefix_memory.peak(count) <= 20 * 2**30 < prefix_memory.peak(count - 1)


@pytest.mark.parametrize("budget_gib, expected", [(72, 16), (23.7, 16), (18.5, 8), (16.5, 4)])
def test_gpu_merges_micro_batches_where_memory_allows(budget_gib, expected):
    """On a GPU, `auto` runs the step's 4 x 4 samples as the fewest micro-batches whose estimate fits the budget
    with every layer checkpointed (then choose_fast_path checkpoints the fewest that fit); on a CPU, with
    several processes or DeepSpeed, a fixed checkpointing choice, 4-bit or merge_micro_batches='off', the
    configured split stays."""
    from ironman_nb.train import GPU_PREFIX_MIN_BATCH, choose_micro_batch

    longest, prefix = 549, 244  # the bench's persona samples, embedded tokenizer

    def estimate(batch):
        if batch >= GPU_PREFIX_MIN_BATCH:
            return _qwen2_7b_memory(batch * (longest - prefix), prefix)
        return _qwen2_7b_memory(batch * longest)

    cfg = TrainConfig(precision="bf16")
    budget = budget_gib * 2**30
    chosen = choose_micro_batch(cfg, "cuda", 1, estimate, budget)
    assert chosen == expected
    assert estimate(chosen).peak(28) <= budget or chosen == 4
    assert all(estimate(b).peak(28) > budget for b in (8, 16) if b > chosen)
    # What then runs, as measured on the H100 (scripts/perf/README.md): 16 samples with the shared prefix, no checkpointing
    # on the card's own budget, 25 of 28 layers checkpointed within 23.7 GiB.
    if chosen == 16 and budget_gib in (72, 23.7):
        merged = TrainConfig(precision="bf16", max_memory_gib=budget_gib, per_device_train_batch_size=16,
                             gradient_accumulation_steps=1)
        fast = choose_fast_path(merged, "cuda", _qwen2_7b_memory(16 * longest), model_type="qwen2",
                                prefix_memory=estimate(16))
        assert fast.shared_prefix and not fast.padding_free
        expected_checkpointing = (False, None) if budget_gib == 72 else (True, 25)
        assert (fast.gradient_checkpointing, fast.checkpointed_layers) == expected_checkpointing
    for other in (dict(merge_micro_batches="off"), dict(gradient_checkpointing="off"), dict(quantization="4bit"),
                  dict(launcher="deepspeed")):
        assert choose_micro_batch(TrainConfig(precision="bf16", **other), "cuda", 1, estimate, budget) == 4
    assert choose_micro_batch(cfg, "cpu", 1, estimate, budget) == 4
    assert choose_micro_batch(cfg, "cuda", 2, estimate, budget) == 4


def test_memory_estimate_falls_as_layers_are_checkpointed():
    memory = _qwen2_7b_memory(4096)
    peaks = [memory.peak(c) for c in range(memory.layers + 1)]
    assert all(a > b for a, b in zip(peaks, peaks[1:]))
    assert peaks[-1] - memory.weights - memory.logits == 28 * memory.layer_input


def test_checkpointed_layers_are_spread_evenly():
    from ironman_nb.train import spread_layers

    assert spread_layers(14, 28) == list(range(0, 28, 2))  # as transformers' every_n_layers=2
    assert spread_layers(3, 28) == [0, 9, 18] and spread_layers(1, 28) == [0]
    assert all(len(set(spread_layers(k, 28))) == k and max(spread_layers(k, 28)) < 28 for k in range(1, 29))


def test_memory_estimate_counts_the_weights_as_loaded(tmp_path, tiny_model_dir, monkeypatch):
    """fp16 training loads the base in fp16 (the grad scaler needs fp32 only for the LoRA weights, which peft
    keeps in fp32): the estimate counts 2 bytes per weight and 2 per activation element."""
    import ironman_nb.train as train_module

    class Captured(Exception):
        pass

    def capture(cfg, device, memory, *args, **kwargs):
        raise Captured(memory)

    monkeypatch.setattr(train_module, "choose_fast_path", capture)
    with pytest.raises(Captured) as caught:
        build_trainer(tiny_cfg(tmp_path, tiny_model_dir, precision="fp16"))
    memory = caught.value.args[0]
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert memory.weights == 2 * sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    tokens = memory.logits // (4 * config.vocab_size)
    assert memory.layer_input == tokens * config.hidden_size * 2


def test_partial_checkpointing_gives_the_plain_gradients(tmp_path, tiny_model_dir, monkeypatch):
    """Checkpointing 1 of the 2 layers checkpoints layer 0 only (transformers turns on all when training starts;
    the project's callback turns layer 1 back off), and the optimizer sees the gradients of training without
    checkpointing."""
    import dataclasses

    import ironman_nb.train as train_module

    choose = train_module.choose_fast_path
    grads, flags = {}, {}
    for count in (None, 1):
        if count:
            monkeypatch.setattr(train_module, "choose_fast_path", lambda *a, **k: dataclasses.replace(
                choose(*a, **k), gradient_checkpointing=True, checkpointed_layers=count))
        setup, grads[count] = _train_capturing_gradients(tiny_cfg(
            tmp_path / str(count), tiny_model_dir, max_steps=2, eval_steps=0, save_steps=100, **BATCH_MODES["padded"]))
        layers = setup.trainer.model.base_model.model.model.layers
        flags[count] = [layer.gradient_checkpointing for layer in layers]
    assert flags == {None: [False, False], 1: [True, False]}
    assert len(grads[None]) == 2
    _assert_same_gradients(grads[None], grads[1], rtol=1e-5, atol=1e-7)


def test_longest_sample(tmp_path, tiny_model_dir):
    from ironman_nb.train import longest_sample

    setup = build_trainer(tiny_cfg(tmp_path, tiny_model_dir))
    assert longest_sample(setup.trainer.train_dataset) == max(len(r["input_ids"]) for r in setup.trainer.train_dataset)


def test_liger_kernels_are_for_cuda_only():
    from ironman_nb.config import ConfigError

    assert choose_fast_path(TrainConfig(), "cpu").liger_kernel is False  # installed here, but Triton needs a GPU
    with pytest.raises(ConfigError, match="liger_kernel.*CUDA"):
        choose_fast_path(TrainConfig(liger_kernel="on"), "cpu")


def test_liger_kernels_patch_only_the_given_model(tiny_model_dir):
    """Liger's fused RMSNorm and SwiGLU replace this instance's forwards; the loss and other models stay as they were."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from ironman_nb.train import apply_liger_kernels

    module_before = dict(vars(modeling_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert apply_liger_kernels(model) is True
    layer = model.model.layers[0]
    assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
    assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
    assert model.model.norm.forward.__func__ is LigerRMSNorm.forward
    assert "forward" not in vars(model)  # no fused loss: the project's loss (logits at labelled positions) stays
    assert "forward" not in vars(other.model.layers[0].mlp) and "forward" not in vars(other.model.norm)
    assert {k: v for k, v in vars(modeling_llama).items() if module_before.get(k) is not v} == {}


def test_train_writes_adapter_state_and_config(tmp_path, tiny_model_dir):
    result = train(tiny_cfg(tmp_path, tiny_model_dir))
    out = tmp_path / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_state.json", "run_config.json"):
        assert (out / name).is_file(), name
    assert not (out / ".final.tmp").exists()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h for h in history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(h["loss"]) and "grad_norm" in h and "learning_rate" in h for h in losses)
    evals = [h for h in history if "eval_loss" in h]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 4
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["resolved"]["precision"] == "fp32" and run_config["resolved"]["shared_prefix"] is True
    assert run_config["resolved"]["end_of_turn_token"] == "<|im_end|>"
    assert run_config["result"]["global_step"] == 4
    assert run_config["result"]["eval_loss_after"] < run_config["result"]["eval_loss_before"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    assert result.summary().loc["global_step", "value"] == 4


def test_bf16_on_cpu_trains_with_grouped_matmul_attention(tmp_path, tiny_model_dir):
    """The bf16 CPU path end to end: the model runs grouped_matmul attention, the loss is finite and the
    held-out loss falls."""
    result = train(tiny_cfg(tmp_path, tiny_model_dir, precision="bf16", eval_steps=4))
    run_config = json.loads((tmp_path / "adapter" / "run_config.json").read_text())
    resolved = run_config["resolved"]
    assert (resolved["precision"], resolved["attn_implementation"], resolved["shared_prefix"]) == (
        "bf16", "grouped_matmul", True)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert run_config["result"]["eval_loss_after"] < run_config["result"]["eval_loss_before"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_loss_history(tmp_path, tiny_model_dir, precision):
    first = train(tiny_cfg(tmp_path / "a", tiny_model_dir, eval_steps=0, precision=precision))
    second = train(tiny_cfg(tmp_path / "b", tiny_model_dir, eval_steps=0, precision=precision))
    pick = lambda r: [(h["step"], h["loss"], h["grad_norm"]) for h in r.log_history if "loss" in h]
    assert pick(first) == pick(second)


def test_resume_continues_from_the_newest_complete_checkpoint(tmp_path, tiny_model_dir, caplog):
    full = train(tiny_cfg(tmp_path / "full", tiny_model_dir, eval_steps=0))
    cfg = tiny_cfg(tmp_path / "cut", tiny_model_dir, eval_steps=0)
    train(cfg)
    checkpoints = tmp_path / "cut" / "adapter" / "checkpoints"
    # As if the run died while writing checkpoint-4: its adapter weights never landed.
    (checkpoints / "checkpoint-4" / "adapter_model.safetensors").unlink()
    assert find_resume_checkpoint(checkpoints, "auto") == str(checkpoints / "checkpoint-2")
    assert "skipping incomplete checkpoint" in caplog.text
    resumed = train(cfg)
    assert resumed.run_config["resolved"]["resumed_from"] == str(checkpoints / "checkpoint-2")
    last = lambda r: [h for h in r.log_history if "loss" in h][-1]
    assert last(resumed)["step"] == last(full)["step"] == 4
    assert last(resumed)["loss"] == pytest.approx(last(full)["loss"], rel=1e-5)


def test_changed_parameters_start_fresh_and_keep_the_old_checkpoints(tmp_path, tiny_model_dir, caplog):
    first = train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0))
    assert first.run_config["resolved"]["resumed_from"] is None
    again = train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0, max_steps=6))  # longer: continues
    assert again.run_config["resolved"]["resumed_from"].endswith("checkpoint-4")
    changed = train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0, lora_r=4))
    assert changed.run_config["resolved"]["resumed_from"] is None
    assert "made with other parameters (lora_r 8 → 4)" in caplog.text
    stale = [p for p in (tmp_path / "adapter").iterdir() if p.name.startswith("checkpoints.stale-")]
    assert len(stale) == 1 and (stale[0] / "checkpoint-6").is_dir()


def test_training_warns_when_the_disk_cannot_hold_the_merge(tmp_path, tiny_model_dir, monkeypatch, caplog):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=2**10))
    result = train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0, max_steps=1))
    from transformers import AutoModelForCausalLM

    warned = [r.getMessage() for r in caplog.records if "merging this adapter" in r.getMessage()]
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert warned == [f"merging this adapter (notebook 04, which saves the merged model in the training precision) "
                      f"needs about {human_size(parameters * 4)} on the disk of {tmp_path / 'adapter'}, which has "
                      f"1.0 KB free. {DISK_ADVICE}"]
    assert result.run_config["result"]["global_step"] == 1  # a warning: the training itself goes ahead


def test_gpu_out_of_memory_says_what_ran_and_what_to_change(tmp_path, tiny_model_dir, monkeypatch):
    import torch
    from transformers import Trainer

    from ironman_nb.train import TrainingOutOfMemory

    real_step, calls = Trainer.training_step, []

    def step_until_out_of_memory(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the first micro-batch of optimizer step 3 (2 per step), after checkpoint-2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.06 GiB is free.\nmore detail")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", step_until_out_of_memory)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0, gradient_checkpointing="off")
    with pytest.raises(TrainingOutOfMemory) as caught:
        train(cfg)
    message = str(caught.value)
    checkpoints = tmp_path / "adapter" / "checkpoints"
    assert message.startswith("the GPU ran out of memory at step 2 (CUDA out of memory. Tried to allocate 2.00 GiB. "
                              "GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.). It ran 2 samples "
                              "per micro-batch x 2 per optimizer step, samples up to max_length=512 tokens, gradient "
                              "checkpointing off.")
    assert "max_memory_gib" in message and "gradient_checkpointing='on'" in message
    assert message.endswith(f"The checkpoints in {checkpoints} are kept: with resume='auto' a new run continues from "
                            "the newest.")
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


def test_a_finished_training_leaves_no_model_in_memory(tmp_path, tiny_model_dir, model_release_watch):
    """JupyterLab keeps notebook 02's kernel alive: the trained model must be garbage when `train` returns, so that
    its GPU memory goes back for notebooks 04 and 05 (models.release_gpu_memory)."""
    import ironman_nb.train as train_module

    model_release_watch.watch(train_module)
    train(tiny_cfg(tmp_path, tiny_model_dir, max_steps=2, eval_steps=1))
    assert len(model_release_watch.loaded) == 1 and model_release_watch.alive == [0]


def test_new_training_data_starts_fresh_instead_of_resuming(tmp_path, tiny_model_dir, caplog):
    """Notebook 01 rewrites the same data folder: checkpoints of the old data must not be continued."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0)  # writes the data once
    first = train(cfg)
    train_file = tmp_path / "data" / "train.jsonl"
    rows = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines()]
    rows[0]["messages"][-1]["content"] = "완전히 새로운 답이야. 다시 배워."
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    again = train(cfg)
    assert again.run_config["resolved"]["resumed_from"] is None
    assert "were made with other parameters (train_data_sha256" in caplog.text
    assert again.run_config["result"]["train_loss"] != first.run_config["result"]["train_loss"]


def test_resume_never_sets_the_earlier_checkpoints_aside(tmp_path, tiny_model_dir):
    train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0, max_steps=6))
    train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0, resume="never", learning_rate=5e-4))
    checkpoints = tmp_path / "adapter" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    stale = [p for p in (tmp_path / "adapter").iterdir() if p.name.startswith("checkpoints.stale-")]
    assert len(stale) == 1 and (stale[0] / "checkpoint-6").is_dir()


def test_a_finished_run_is_not_stepped_past_its_end(tmp_path, tiny_model_dir, caplog):
    """Run All again on a finished run: Trainer would train one step more each time; nothing is trained. With
    fewer steps asked than a checkpoint has, training starts from the beginning."""
    first = train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0))
    # The adapter is readable as any file written here is (safetensors writes 0600).
    mode = lambda name: (first.output_dir / name).stat().st_mode & 0o777
    assert mode("adapter_model.safetensors") == mode("run_config.json")
    again = train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0))
    assert again.run_config == first.run_config and "already ran to step 4" in caplog.text
    shorter = train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0, max_steps=2))
    assert shorter.run_config["resolved"]["resumed_from"] is None
    assert shorter.run_config["result"]["global_step"] == 2
    assert "reached step 4, past the 2 planned now" in caplog.text


@pytest.mark.parametrize("eval_steps", [3, 0])
def test_a_run_killed_during_its_final_save_is_saved_from_its_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch,
                                                                             caplog, eval_steps):
    """Training reached its last step and checkpoint, then the process died while saving the adapter: the next
    run saves that checkpoint's adapter and evaluates it; it does not train again."""
    import ironman_nb.train as train_module
    from safetensors.torch import load_file
    from transformers import Trainer

    real_save = train_module._save_final

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    reference = train(tiny_cfg(tmp_path / "reference", tiny_model_dir, eval_steps=eval_steps))
    monkeypatch.setattr(train_module, "_save_final", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=eval_steps))
    monkeypatch.setattr(train_module, "_save_final", real_save)
    last = tmp_path / "adapter" / "checkpoints" / "checkpoint-4"
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(Trainer, "training_step", no_training)
    finished = train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=eval_steps))
    assert "saving the adapter from that checkpoint instead of training again" in caplog.text
    result = finished.run_config["result"]
    assert result["global_step"] == 4 and result["train_loss"] is None
    saved, kept = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "adapter", last))
    assert saved.keys() == kept.keys() and all((saved[k] == kept[k]).all() for k in saved)
    # Evaluated at 0 (and 3): the held-out loss after step 4 is computed from the checkpoint's weights.
    assert [h["step"] for h in finished.log_history if "eval_loss" in h] == ([0, 3, 4] if eval_steps else [0, 4])
    assert result["eval_loss_after"] == pytest.approx(reference.run_config["result"]["eval_loss_after"], rel=1e-5)
    assert result["eval_loss_after"] != result["eval_loss_before"]
    assert train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=eval_steps)).run_config == finished.run_config  # now done


def test_resume_skips_checkpoints_that_cannot_be_continued(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file, save_file

    train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0, max_steps=6))
    checkpoints = tmp_path / "adapter" / "checkpoints"
    (checkpoints / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log_hi')  # cut short
    adapter = checkpoints / "checkpoint-4" / "adapter_model.safetensors"
    tensors = load_file(str(adapter))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))  # a step went bad between two log lines
    save_file(tensors, str(adapter))
    assert find_resume_checkpoint(checkpoints, "auto") == str(checkpoints / "checkpoint-2")
    with pytest.raises(ValueError, match="holds NaN or inf"):
        find_resume_checkpoint(checkpoints, str(checkpoints / "checkpoint-4"))


def test_an_interrupt_saves_a_checkpoint_and_a_second_stops_at_once(tmp_path, tiny_model_dir, monkeypatch):
    """JupyterLab's Interrupt (SIGINT) during training: a checkpoint at the end of the step, then a clear stop."""
    import os
    import signal

    from transformers import Trainer

    from ironman_nb.train import TrainingInterrupted

    real_step, calls = Trainer.training_step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first micro-batch of step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupted_step)
    with pytest.raises(TrainingInterrupted, match="stopped at step 2 after saving"):
        train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0, save_steps=100))
    assert (tmp_path / "adapter" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back

    calls.clear()

    def interrupted_twice(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupted_twice)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "twice", tiny_model_dir, eval_steps=0, save_steps=100))


def test_a_final_save_that_writes_no_adapter_fails_loudly(tmp_path, tiny_model_dir, monkeypatch):
    """As Trainer.save_model does from a sharded FSDP state dict: the folder, but no adapter file. The run must not
    end as if it had saved one (notebook 04 would then merge whatever adapter an earlier run left)."""
    import os

    from transformers import Trainer

    real_save = Trainer.save_model

    def save_no_adapter(self, output_dir=None, _internal_call=False):
        if _internal_call:  # checkpoints as usual
            return real_save(self, output_dir, _internal_call)
        os.makedirs(output_dir, exist_ok=True)

    monkeypatch.setattr(Trainer, "save_model", save_no_adapter)
    with pytest.raises(RuntimeError, match="saving wrote no adapter_model.safetensors .*FULL_STATE_DICT"):
        train(tiny_cfg(tmp_path, tiny_model_dir, eval_steps=0))
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter" / "run_config.json").exists()


def test_resume_options(tmp_path):
    assert find_resume_checkpoint(tmp_path / "none", "auto") is None
    assert find_resume_checkpoint(tmp_path, "never") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_resume_checkpoint(tmp_path, str(tmp_path))


def test_non_finite_loss_stops_training():
    from transformers import TrainerControl, TrainerState

    from ironman_nb.train import _nonfinite_stop_callback

    from types import SimpleNamespace

    bf16, fp16 = SimpleNamespace(fp16=False), SimpleNamespace(fp16=True)
    callback = _nonfinite_stop_callback()
    state = TrainerState()
    state.global_step = 3
    control = callback.on_log(bf16, state, TrainerControl(), logs={"loss": 1.0, "grad_norm": 0.5})
    assert not control.should_training_stop
    control = callback.on_log(bf16, state, TrainerControl(), logs={"loss": float("nan"), "grad_norm": 0.5})
    assert control.should_training_stop and not control.should_save
    assert callback.bad["step"] == 3 and math.isnan(callback.bad["loss"])
    diverged = _nonfinite_stop_callback()
    assert diverged.on_log(bf16, state, TrainerControl(), logs={"loss": 1.0, "grad_norm": float("inf")}).should_training_stop


def test_fp16_grad_scaler_overflow_does_not_stop_training():
    """In fp16 the grad scaler skips a step whose gradients overflow (grad norm inf or nan) and halves its scale:
    that happens in the first steps and each time the scale grows. Only a non-finite loss means divergence."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from ironman_nb.train import _nonfinite_stop_callback

    fp16 = SimpleNamespace(fp16=True)
    callback = _nonfinite_stop_callback()
    for value in (float("inf"), float("nan")):
        control = callback.on_log(fp16, TrainerState(), TrainerControl(), logs={"loss": 2.3, "grad_norm": value})
        assert not control.should_training_stop and callback.bad is None
    assert callback.on_log(fp16, TrainerState(), TrainerControl(), logs={"loss": float("nan")}).should_training_stop


def test_missing_data_names_the_notebook(tmp_path, tiny_model_dir):
    from ironman_nb.data import DataError

    with pytest.raises(DataError, match="run notebooks/01_prepare_data.ipynb first"):
        train(TrainConfig(base_model=str(tiny_model_dir), data_dir=str(tmp_path / "nothing"), output_dir=str(tmp_path / "o")))


def test_four_bit_profile_trains_and_merges(tmp_path, tiny_model_dir):
    """QLoRA: NF4 base weights (bitsandbytes' CPU backend here), checkpointing on, an adapter that merges."""
    pytest.importorskip("bitsandbytes")
    from ironman_nb.config import MergeConfig
    from ironman_nb.merge import merge

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # bitsandbytes' CPU kernels want rows of at least 64 values: a wider tiny model.
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.update({"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2})
    wide = tmp_path / "wide-model"
    AutoModelForCausalLM.from_config(config).save_pretrained(wide)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(wide)
    cfg = tiny_cfg(tmp_path, wide, quantization="4bit", max_steps=2, eval_steps=0, save_steps=10)
    # bitsandbytes' CPU inference kernel (used in eval mode only) rejects these small shapes: train without eval here.
    (tmp_path / "data" / "eval.jsonl").unlink()
    result = train(cfg)
    resolved = result.run_config["resolved"]
    assert resolved["quantization"] == "4bit" and resolved["gradient_checkpointing"] is True
    assert resolved["shared_prefix"] is True  # on a CPU it stays with checkpointing, also over a 4-bit base
    assert all(math.isfinite(h["loss"]) for h in result.log_history if "loss" in h)
    merged = merge(MergeConfig(base_model=str(wide), adapter_dir=str(tmp_path / "adapter"),
                               output_dir=str(tmp_path / "merged")))
    assert merged.checks["saved dtype"] == "fp32"


def test_four_bit_profile_parameters_match_the_notebook():
    from ironman_nb.runner import profile_params

    params = profile_params("gpu24gb")["02_train_lora"]
    assert TrainConfig.from_params(**params).quantization == "4bit"


def test_no_html_progress_bar_in_a_jupyter_kernel(tmp_path, tiny_model_dir, monkeypatch):
    """transformers' notebook progress bar raised TypeError at the end of an interrupted training (in place of
    TrainingInterrupted); the [train] step lines show progress instead."""
    import transformers.trainer
    from transformers.utils.notebook import NotebookProgressCallback

    monkeypatch.setattr(transformers.trainer, "DEFAULT_PROGRESS_CALLBACK", NotebookProgressCallback)  # as in Jupyter
    setup = build_trainer(tiny_cfg(tmp_path, tiny_model_dir))
    kinds = [type(c).__name__ for c in setup.trainer.callback_handler.callbacks]
    assert "NotebookProgressCallback" not in kinds and "ProgressLog" in kinds


def test_a_run_resumed_in_its_second_epoch_trains_as_if_never_stopped(tmp_path, tiny_model_dir):
    """Length-grouped batches: transformers drew each epoch's order from the global random state, which a resumed
    run restores only after drawing, so a run resumed in epoch 2 replayed epoch 1's order (some samples twice)."""
    import shutil

    params = dict(max_steps=-1, num_train_epochs=3, save_steps=1, save_total_limit=0, eval_steps=0)
    full = train(tiny_cfg(tmp_path / "full", tiny_model_dir, **params))  # 12 samples, 4 per step: 3 steps an epoch
    assert full.run_config["resolved"]["shared_prefix"] and not full.run_config["resolved"]["padding_free"]
    kept = tmp_path / "resumed" / "adapter" / "checkpoints"
    shutil.copytree(tmp_path / "full" / "adapter" / "checkpoints", kept)
    for later in range(5, 10):
        shutil.rmtree(kept / f"checkpoint-{later}")
    resumed = train(tiny_cfg(tmp_path / "resumed", tiny_model_dir, **params, data_dir=str(tmp_path / "full" / "data")))
    assert resumed.run_config["resolved"]["resumed_from"] == str(kept / "checkpoint-4")  # one step into epoch 2
    losses = lambda r: [(h["step"], h["loss"]) for h in r.log_history if "loss" in h and h["step"] > 4]
    assert [s for s, _ in losses(resumed)] == [5, 6, 7, 8, 9]
    assert [l for _, l in losses(resumed)] == pytest.approx([l for _, l in losses(full)], rel=1e-5)


def test_a_few_rows_with_their_own_system_prompt_keep_the_shared_prefix_for_the_rest(tmp_path, tiny_model_dir):
    """One sheet row with a `system` cell of its own made the common prefix of all rows 0, so every batch used
    its own prefix and the micro-batches of a step stopped sharing one pass (and the memory plan assumed none)."""
    from ironman_nb.train import shared_prefix_length

    persona = [7] * 20
    rows = [[1, 2, 3] + [9] * 18 + [4]] + [persona + [i, i + 1] for i in range(5)]
    assert shared_prefix_length(rows, 16) == 20
    assert shared_prefix_length(rows[:2], 16) == 0  # no majority: the prefix of all rows
    train_file = write_chat_data(tmp_path / "mixed", train_rows=8) / "train.jsonl"
    records = [json.loads(line) for line in train_file.read_text(encoding="utf-8").splitlines()]
    records[-1]["messages"][0]["content"] = "너는 페퍼 포츠야. 침착하게 답해."  # a row's own system prompt
    train_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    setup = build_trainer(tiny_cfg(tmp_path, tiny_model_dir, data_dir=str(tmp_path / "mixed"), max_steps=1,
                                   eval_steps=0, gradient_accumulation_steps=2))
    assert len(setup.train_records) == 8 and setup.trainer.data_collator.max_prefix >= 16
