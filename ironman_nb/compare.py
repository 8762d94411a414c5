"""Before / after: the base and the tuned model on the same prompts, and on the held-out data.

Generation goes through each tokenizer's chat template (never a hand-written prompt string), greedy, in
left-padded batches. The objective measure is the mean assistant-token negative log-likelihood on the
held-out `eval.jsonl`, with a paired bootstrap confidence interval on the difference.
"""
from __future__ import annotations

import dataclasses
import html
import io
import logging
import re
from pathlib import Path

from .config import CompareConfig
from .data import prompt_messages, tokenize_conversation
from .io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from .models import (ModelNotFoundError, few_row_linear, load_model, load_tokenizer, release_gpu_memory,
                     releases_gpu_memory, resolve_device, resolve_precision, sdpa_without_cudnn, stop_token_ids)

log = logging.getLogger(__name__)

# Answers that call themselves an AI / language model (the persona breaking), in Korean and English: a first-person
# topic (저는, 나는, 난, 전 — not the end of a word: 발전, 이전; not 전 세계; not 내가/제가, the subject of "내가 만든 AI",
# Tony's own work), a few words within the sentence, the AI noun and a copula ("저는 AI 어시스턴트입니다"); a
# model's own self-introduction ("대규모 언어 모델입니다"); "I'm (Name,) an AI assistant". Talk about Jarvis or
# Friday ("자비스는 내가 만든 AI야") and "내가 AI 연구를 했지" are in persona (tests list more).
PERSONA_BREAK = re.compile(
    r"(?<![가-힣])(?:저는|나는|난|전(?!\s+(?:세계|세상|국민|우주)))\s+[^.!?,\n]{0,30}?"
    r"(?:AI|인공\s*지능|(?:대규모\s*|대형\s*)?언어\s*모델|챗봇|어시스턴트|비서)\s*(?:모델|어시스턴트|비서|챗봇)?"
    r"\s*(?:입니다|이에요|예요|이야|야|이라서|로서|일\s*뿐|에\s*불과)"
    r"|(?:대규모|대형)\s*언어\s*모델\s*(?:입니다|이에요|예요|이야)|언어\s*모델로서"
    r"|\bI(?:'m| am)(?: [A-Z][\w-]*,)? (?:just |only )?(?:an? |the )?(?:large )?"
    r"(?:AI|artificial intelligence|language model|chatbot|(?:AI |virtual )?assistant)\b"
    r"|\bas an AI\b",
    re.IGNORECASE,
)
# Words of Tony Stark's world (README: "Comparison metrics"), as whole words: not inside another word (멜로디,
# 안토니오, 스타크래프트, 페퍼민트) but with a particle after them (토니가, 슈트를).
PERSONA_MARKERS = ("토니", "스타크", r"토니\s*스타크", r"아이언\s*맨", "슈트", "수트", "자비스", "프라이데이", r"아크\s*원자로",
                   "페퍼", "로디", "어벤[져저]스", "억만장자", "Tony", "Stark", r"Iron\s*Man", r"J\.?A\.?R\.?V\.?I\.?S", "FRIDAY")
# 로 and 라 count only where a particle ends there or goes on as one (슈트로, 토니라고), not inside another word
# (페퍼로니, 슈트라우스).
PARTICLE = ("(?:[은는이가을를의에와과도만야아여님씨랑께란]|로(?![가-힣])|로[는도서써]|라(?![가-힣])|라[고는면도]"
            "|한테|에게|으로|처럼|보다|까지|부터|하고|이고|이야|이랑|였|이었)")
PERSONA_MARKER = re.compile(
    "(?<![가-힣A-Za-z])(?:" + "|".join(PERSONA_MARKERS) + f")(?:(?![가-힣A-Za-z])|(?={PARTICLE}))", re.IGNORECASE)
HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
HAN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]")
BOOTSTRAP_SAMPLES = 2000
# Fewer held-out samples give no interval: resampling 1 sample gives a zero-width "interval", 2 give 3 values.
MIN_INTERVAL_SAMPLES = 5


def clean_answer(text: str) -> str:
    """Drop the half of a Hangul syllable (U+FFFD) that a cut-off answer can end with."""
    return text.rstrip("\ufffd").strip()


def answer_stats(text: str, ended: bool) -> dict:
    letters = [c for c in text if c.isalpha()]
    hangul = sum(1 for c in letters if HANGUL.match(c))
    return {
        "ended_with_eot": ended,
        "hangul_share": round(hangul / len(letters), 4) if letters else None,  # no letters: says nothing
        "has_han": bool(HAN.search(text)),
        "persona_break": bool(PERSONA_BREAK.search(text)),
        "persona_marker": bool(PERSONA_MARKER.search(text)),
        "chars": len(text),
    }


def summarise(stats: list[dict]) -> dict:
    """Means over the answers (None where there is nothing to average: no answers, or no answer with letters)."""
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return {
        "eot_rate": mean(s["ended_with_eot"] for s in stats),
        "hangul_share": mean(s["hangul_share"] for s in stats),
        "han_rate": mean(s["has_han"] for s in stats),
        "persona_break_rate": mean(s["persona_break"] for s in stats),
        "persona_marker_rate": mean(s["persona_marker"] for s in stats),
        "mean_chars": mean(s["chars"] for s in stats),
    }


def generate_answers(model, tokenizer, prompts: list[str], system_prompt: str, max_new_tokens: int,
                     batch_size: int, share_prefix: bool = True) -> list[tuple[str, bool]]:
    """Greedy answers in batches; (text, ended with the end-of-turn token) per prompt (see generate_token_ids)."""
    return [(clean_answer(tokenizer.decode(ids, skip_special_tokens=True)), ended)
            for ids, ended in generate_token_ids(model, tokenizer, prompts, system_prompt, max_new_tokens, batch_size,
                                                 share_prefix)]


def generate_token_ids(model, tokenizer, prompts: list[str], system_prompt: str, max_new_tokens: int,
                       batch_size: int, share_prefix: bool = True) -> list[tuple[list[int], bool]]:
    """Greedy answers in batches; (new token ids up to the end-of-turn token, ended with it) per prompt.

    The tokens every prompt starts with (the persona system turn) run through the model once; each batch
    reuses their keys/values. Rows are laid out [shared prefix | padding | own tokens], with the padding masked,
    so a batch gives the same answers as one prompt at a time.
    """
    import copy

    import torch

    from .train import common_prefix_length

    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    encoded = [
        tokenizer.apply_chat_template(prompt_messages(p, system_prompt), tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
        for p in prompts
    ]
    encoded = [list(ids["input_ids"]) if isinstance(ids, dict) else list(ids) for ids in encoded]
    prefix_len = min(common_prefix_length(encoded), min(len(ids) for ids in encoded) - 1) if share_prefix and encoded else 0
    prefix_cache = None
    if prefix_len > 0:
        with torch.no_grad():
            prefix = torch.tensor([encoded[0][:prefix_len]], device=model.device)
            prefix_cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache
    pad = tokenizer.pad_token_id
    results = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        width = max(len(r) for r in rows)
        # Padding goes right after the shared prefix (or first, without one): the left padding that batched
        # greedy decoding needs to match one-at-a-time output.
        ids = [r[:prefix_len] + [pad] * (width - len(r)) + r[prefix_len:] for r in rows]
        mask = [[1] * prefix_len + [0] * (width - len(r)) + [1] * (len(r) - prefix_len) for r in rows]
        inputs = {"input_ids": torch.tensor(ids, device=model.device), "attention_mask": torch.tensor(mask, device=model.device)}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
            inputs["cache"] = cache
        with torch.no_grad(), few_row_linear(model):
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        for row in out[:, width:].tolist():
            ended = any(t in stop_ids for t in row)
            if ended:
                row = row[: min(row.index(t) for t in stop_ids if t in row)]
            results.append((row, ended))
    return results


def assistant_nll(model, tokenizer, records: list[dict], batch_size: int = 4) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each record's final assistant turn, as trained (end-of-turn included).

    As in training, the LM head runs only at the answer positions (train.answer_rows_only) and the log-softmax a
    chunk of rows at a time. Logits at every position of a batch, as cross-entropy wants them, hold 4 × 1,024 ×
    152k entries for Qwen2 at 4 samples of 1,024 tokens: 1.2 GiB in bf16 and 2.3 GiB for each fp32 copy — beside
    a 7B model on a 24 GB card, more than is left."""
    import torch

    from .loss import chunk_rows
    from .train import answer_positions, answer_rows_only, next_token_targets

    encoded = [tokenize_conversation(tokenizer, r["messages"]) for r in records]
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in chunk], device=model.device)
        labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in chunk], device=model.device)
        mask = (torch.arange(width, device=model.device)[None] < torch.tensor([len(e["input_ids"]) for e in chunk], device=model.device)[:, None]).long()
        targets = next_token_targets(labels)
        index = answer_positions(targets)
        with torch.no_grad(), answer_rows_only(model, index, targets.shape):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if logits.dim() == 3:  # a model without a separate output layer: select the answer rows here
            logits = logits.flatten(0, 1).index_select(0, index)
        answer_targets = targets.flatten().index_select(0, index)
        rows = chunk_rows(logits.shape[-1], logits.device.type)
        nll = torch.cat([
            torch.logsumexp(logits[s:s + rows].float(), dim=-1)
            - logits[s:s + rows].gather(1, answer_targets[s:s + rows, None]).squeeze(1).float()
            for s in range(0, logits.shape[0], rows)
        ]) if len(index) else torch.zeros(0, device=model.device)
        record_of = index // width
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=model.device).index_add_(0, record_of, nll.double())
        counts = torch.bincount(record_of, minlength=len(chunk))
        out.extend(zip(sums.tolist(), counts.tolist()))
    return out


def paired_bootstrap(before: list[tuple[float, int]], after: list[tuple[float, int]], samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> dict:
    """95 % interval of (after − before) token-weighted mean NLL, resampling held-out samples in pairs (None
    below MIN_INTERVAL_SAMPLES samples)."""
    import numpy as np

    # Each side's mean over its own token counts, as metrics.json reports eval_nll (they differ where the two
    # tokenizers or chat templates do).
    b_sum, b_count = np.array([s for s, _ in before]), np.array([c for _, c in before], dtype=float)
    a_sum, a_count = np.array([s for s, _ in after]), np.array([c for _, c in after], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(b_count), size=(samples, len(b_count)))
    diffs = a_sum[idx].sum(1) / a_count[idx].sum(1) - b_sum[idx].sum(1) / b_count[idx].sum(1)
    point = a_sum.sum() / a_count.sum() - b_sum.sum() / b_count.sum()
    if len(b_count) < MIN_INTERVAL_SAMPLES:
        return {"difference": float(point), "ci95": None, "bootstrap_samples": 0}
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": float(point), "ci95": [float(low), float(high)], "bootstrap_samples": samples}


@dataclasses.dataclass
class CompareResult:
    output_dir: Path
    rows: list[dict]
    metrics: dict

    def table(self):
        import pandas as pd

        return pd.DataFrame([{"prompt": r["prompt"], "before": r["before"], "after": r["after"]} for r in self.rows])

    def metrics_table(self):
        import pandas as pd

        keys = ["eval_nll"] + list(self.metrics["before"]["answers"])
        rows = []
        for key in keys:
            pick = (lambda side: self.metrics[side]["eval_nll"]) if key == "eval_nll" else (lambda side: self.metrics[side]["answers"][key])
            rows.append((key, pick("before"), pick("after")))
        return pd.DataFrame(rows, columns=["metric", "before", "after"]).set_index("metric")


def _markdown(rows: list[dict], metrics: dict) -> str:
    def cell(text: str) -> str:
        # One table row per answer, shown as text: no raw HTML of the model's, no stray "|" or line break.
        text = html.escape(text.replace("\r\n", "\n").replace("\r", "\n"), quote=False)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    lines = ["# Before / after fine-tuning", "", f"- base: `{metrics['base_model']}`", f"- tuned: `{metrics['tuned_model']}`"]
    nll = metrics["eval_nll_difference"]
    if nll:
        interval = (f"95 % CI {nll['ci95'][0]:+.4f} … {nll['ci95'][1]:+.4f}" if nll["ci95"]
                    else f"no interval: fewer than {MIN_INTERVAL_SAMPLES} held-out samples")
        lines.append(f"- held-out assistant NLL: {metrics['before']['eval_nll']:.4f} → {metrics['after']['eval_nll']:.4f} "
                     f"(Δ {nll['difference']:+.4f}, {interval})")
    lines += ["", "| # | prompt | before | after |", "|---|---|---|---|"]
    lines += [f"| {i} | {cell(r['prompt'])} | {cell(r['before'])} | {cell(r['after'])} |" for i, r in enumerate(rows, 1)]
    return "\n".join(lines) + "\n"


def _html(rows: list[dict], metrics: dict) -> str:
    body = "".join(
        f"<tr><td>{i}</td><td>{html.escape(r['prompt'])}</td><td>{html.escape(r['before'])}</td><td>{html.escape(r['after'])}</td></tr>"
        for i, r in enumerate(rows, 1)
    )
    return (
        "<!doctype html><html lang=\"ko\"><head><meta charset=\"utf-8\"><title>Before / after fine-tuning</title>"
        "<style>body{font-family:'Noto Sans KR','Apple SD Gothic Neo','Malgun Gothic',sans-serif;margin:2em}"
        "table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:.5em;vertical-align:top;white-space:pre-wrap}"
        "th{background:#f4f4f4}</style></head><body>"
        f"<h1>Before / after fine-tuning</h1><p>base: <code>{html.escape(metrics['base_model'])}</code> · "
        f"tuned: <code>{html.escape(metrics['tuned_model'])}</code></p>"
        "<table><thead><tr><th>#</th><th>prompt</th><th>before</th><th>after</th></tr></thead>"
        f"<tbody>{body}</tbody></table></body></html>\n"
    )


def metrics_figure(metrics: dict):
    """Before/after bars of the answers' rates and the held-out NLL, each bar labelled with its value; a measure
    with nothing to measure (None) is labelled n/a instead of drawing a bar of zero."""
    import matplotlib.pyplot as plt

    keys = [k for k in metrics["before"]["answers"] if k != "mean_chars"]
    fig, (ax_rates, ax_nll) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [4, 1]})

    def bars(ax, xs, values, color, label, text):
        ax.bar(xs, [float("nan") if v is None else v for v in values], 0.4, color=color, label=label)
        for x, v in zip(xs, values):
            ax.text(x, 0 if v is None else v, "n/a" if v is None else text(v), ha="center", va="bottom", fontsize=7)

    for offset, side, color in ((-0.2, "before", "C0"), (0.2, "after", "C1")):
        bars(ax_rates, [i + offset for i in range(len(keys))], [metrics[side]["answers"][k] for k in keys], color,
             side, lambda v: f"{v * 100:.0f} %")
    ax_rates.set_xticks(list(range(len(keys))), keys, rotation=20)
    ax_rates.set_ylim(0, 1.1)
    ax_rates.set_title("answers")
    ax_rates.legend()
    nll = [metrics["before"]["eval_nll"], metrics["after"]["eval_nll"]]
    if all(v is None for v in nll):
        ax_nll.text(0.5, 0.5, "not measured\n(no held-out data)", transform=ax_nll.transAxes, ha="center", va="center")
        ax_nll.set_xticks([])
        ax_nll.set_yticks([])
    else:
        bars(ax_nll, [0, 1], nll, ["C0", "C1"], None, lambda v: f"{v:.3f}")
        ax_nll.set_xticks([0, 1], ["before", "after"])
    ax_nll.set_title("held-out NLL")
    fig.tight_layout()
    return fig


def metrics_chart(metrics: dict) -> bytes:
    import matplotlib.pyplot as plt

    fig = metrics_figure(metrics)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def vllm_available(device: str) -> bool:
    import importlib.util

    return device == "cuda" and importlib.util.find_spec("vllm") is not None


def generate_answers_vllm(model_name: str, tokenizer, prompts: list[str], system_prompt: str, max_new_tokens: int,
                          precision: str) -> list[tuple[str, bool]]:
    """The same greedy answers through vLLM (used on a GPU where vllm is installed): the prompts' token ids from
    the same chat template (as text, vLLM would add a second BOS to templates that start with one: Llama-3,
    Gemma, Mistral), the same stop tokens, and the repetition penalty of the model's generation config, which
    transformers' `generate` applies by itself (Qwen2-Instruct: 1.05); vLLM batches and caches the shared system
    turn itself."""
    from transformers import GenerationConfig
    from vllm import LLM, SamplingParams

    from .models import resolve_model_path

    path = resolve_model_path(model_name)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: transformers' defaults
        generation_config = GenerationConfig()
    stop_ids = stop_token_ids(tokenizer, generation_config)
    prompt_ids = [list(tokenizer.apply_chat_template(prompt_messages(p, system_prompt), tokenize=True,
                                                     add_generation_prompt=True, return_dict=True)["input_ids"])
                  for p in prompts]
    repetition_penalty = generation_config.repetition_penalty or 1.0
    engine = LLM(model=path, dtype={"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32"),
                 enable_prefix_caching=True, gpu_memory_utilization=vllm_memory_utilization())
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop_ids,
                            repetition_penalty=repetition_penalty)
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
    results = []
    for output in outputs:
        choice = output.outputs[0]
        ended = choice.finish_reason == "stop"
        results.append((clean_answer(choice.text), ended))
    del engine
    release_gpu_memory()
    return results


def vllm_memory_utilization() -> float:
    """The share of the card vLLM may take: 90 % of what is free, since vLLM refuses to start when that share is
    more than is free (another kernel — notebook 02's, say — may still hold memory)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return round(min(0.9, 0.9 * free / total), 3)


def _side(model_name: str, prompts: list[str], eval_records: list[dict], cfg: CompareConfig, device: str, precision: str):
    tokenizer = load_tokenizer(model_name)
    use_vllm = vllm_available(device)
    if use_vllm:  # before the transformers model takes its GPU memory
        try:
            answers = generate_answers_vllm(model_name, tokenizer, prompts, cfg.system_prompt, cfg.max_new_tokens,
                                            precision)
        except Exception as err:  # vLLM only speeds generation up: without it the answers are the same
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("vLLM could not generate with %s (%s: %s); generating with transformers instead", model_name,
                        type(err).__name__, reason)
            use_vllm = False
            release_gpu_memory()
    if use_vllm and not eval_records:  # vLLM answered and there is nothing to score: no need to load it again
        return answers, []
    model = load_model(model_name, precision, device)
    model.eval()
    # As in training (models.sdpa_without_cudnn): each decoding step calls attention once per layer.
    with sdpa_without_cudnn(device == "cuda" and not cfg.cudnn_attention):
        if not use_vllm:
            answers = generate_answers(model, tokenizer, prompts, cfg.system_prompt, cfg.max_new_tokens, cfg.batch_size)
        nll = assistant_nll(model, tokenizer, eval_records) if eval_records else []
    del model
    release_gpu_memory()  # before the other side's model (or vLLM, which needs it free) loads
    return answers, nll


@releases_gpu_memory
def compare(cfg: CompareConfig) -> CompareResult:
    prompts_path = Path(cfg.prompts_path)
    records = read_jsonl(prompts_path, "prompts file")
    prompts = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ValueError(f"{prompts_path}, record {number}: needs a non-empty 'prompt' field")
        prompts.append(record["prompt"].strip())
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    if cfg.eval_data and not Path(cfg.eval_data).is_file():
        # Only "" skips the held-out NLL: a wrong path must not drop the comparison's objective measure unseen.
        raise FileNotFoundError(f"eval_data {cfg.eval_data}: not found (notebook 01 writes eval.jsonl into its "
                                "output_dir; set eval_data = '' to compare without the held-out NLL)")
    eval_records = read_jsonl(cfg.eval_data, "held-out eval.jsonl") if cfg.eval_data else []
    if cfg.max_eval_samples:
        eval_records = eval_records[: cfg.max_eval_samples]

    tuned = Path(cfg.tuned_model).expanduser()
    if tuned.is_dir() and not (tuned / "config.json").is_file():
        # Said now, not after the base model's side has run (minutes for a 7B).
        what = "an adapter folder (notebook 02's)" if (tuned / "adapter_config.json").is_file() else "a folder without config.json"
        raise ModelNotFoundError(f"tuned_model {cfg.tuned_model!r} is {what}: give the merged model folder of "
                                 "notebook 04 (or a Hub model id)")
    device = resolve_device()
    precision = resolve_precision("auto", device)
    before, nll_before = _side(cfg.base_model, prompts, eval_records, cfg, device, precision)
    after, nll_after = _side(cfg.tuned_model, prompts, eval_records, cfg, device, precision)

    rows = []
    for prompt, (b_text, b_end), (a_text, a_end) in zip(prompts, before, after):
        rows.append({"prompt": prompt, "before": b_text, "after": a_text,
                     "before_stats": answer_stats(b_text, b_end), "after_stats": answer_stats(a_text, a_end)})

    def mean_nll(values):
        return sum(s for s, _ in values) / max(1, sum(c for _, c in values)) if values else None

    metrics = {
        "base_model": cfg.base_model,
        "tuned_model": cfg.tuned_model,
        "prompts": len(prompts),
        "eval_samples": len(eval_records),
        "max_new_tokens": cfg.max_new_tokens,
        "before": {"eval_nll": mean_nll(nll_before), "answers": summarise([r["before_stats"] for r in rows])},
        "after": {"eval_nll": mean_nll(nll_after), "answers": summarise([r["after_stats"] for r in rows])},
        "eval_nll_difference": paired_bootstrap(nll_before, nll_after) if nll_before else None,
        "lexicons": {"persona_marker_pattern": PERSONA_MARKER.pattern, "persona_break_pattern": PERSONA_BREAK.pattern},
    }
    out = Path(cfg.output_dir)
    atomic_write_jsonl(out / "comparison.jsonl", rows)
    atomic_write_text(out / "comparison.md", _markdown(rows, metrics))
    atomic_write_text(out / "comparison.html", _html(rows, metrics))
    atomic_write_bytes(out / "metrics.png", metrics_chart(metrics))
    atomic_write_json(out / "metrics.json", metrics)
    return CompareResult(out, rows, metrics)
