import json

import pytest

from ironman_nb.compare import (
    answer_stats,
    assistant_nll,
    clean_answer,
    compare,
    generate_answers,
    paired_bootstrap,
    summarise,
)
from ironman_nb.config import DEFAULT_SYSTEM_PROMPT, CompareConfig


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model with larger random weights, so greedy answers vary from token to token."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ironman_nb.models import load_tokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, load_tokenizer(str(tiny_model_dir))


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = ["안녕?", "아크 원자로는 어떻게 작동해? 자세히 설명해 줘.", "hi", "슈트 몇 벌이야"]
    batched = generate_answers(model, tokenizer, prompts, DEFAULT_SYSTEM_PROMPT, max_new_tokens=12, batch_size=4)
    alone = [generate_answers(model, tokenizer, [p], DEFAULT_SYSTEM_PROMPT, max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == alone
    # The shared system-turn cache changes nothing either: plain left-padded generation gives the same answers.
    plain = generate_answers(model, tokenizer, prompts, DEFAULT_SYSTEM_PROMPT, max_new_tokens=12, batch_size=4,
                             share_prefix=False)
    assert plain == batched
    assert all(len(text) > 10 for text, _ in batched) and len({text for text, _ in batched}) == len(prompts)


def test_nll_counts_only_the_answer(tiny):

    model, tokenizer = tiny
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "토니야."}]}
    (total, count), = assistant_nll(model, tokenizer, [record])
    answer_tokens = tokenizer("토니야.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert count == len(answer_tokens)
    longer = {"messages": record["messages"][:2] + [{"role": "assistant", "content": "토니야. 아이언맨이지."}]}
    pair = assistant_nll(model, tokenizer, [record, longer], batch_size=2)
    assert pair[0][0] == pytest.approx(total, rel=1e-4)  # padding in a batch changes nothing
    assert pair[1][1] > count


def test_nll_equals_cross_entropy_over_full_logits(tiny):
    """Logits only at the answer positions, the log-softmax in chunks: the same numbers as the plain way."""
    import torch
    import torch.nn.functional as F

    from ironman_nb.data import tokenize_conversation

    model, tokenizer = tiny
    records = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": q},
                             {"role": "assistant", "content": a}]}
               for q, a in [("q", "토니야."), ("슈트는?", "마크 85까지 만들었지. 다음은 더 멋질 거야."), ("hi", "안녕.")]]
    expected = []
    for record in records:
        encoded = tokenize_conversation(tokenizer, record["messages"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([encoded["input_ids"]]), use_cache=False).logits[0, :-1].float()
        targets = torch.tensor(encoded["labels"][1:])
        expected.append((float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")),
                         int((targets != -100).sum())))
    got = assistant_nll(model, tokenizer, records, batch_size=2)
    assert [count for _, count in got] == [count for _, count in expected]
    assert [total for total, _ in got] == pytest.approx([total for total, _ in expected], rel=1e-5)


def test_answer_statistics_on_hand_made_answers():
    tony = answer_stats("나는 토니 스타크야. 슈트는 오늘도 완벽해.", ended=True)
    assert tony == {"ended_with_eot": True, "hangul_share": 1.0, "has_han": False, "persona_break": False,
                    "persona_marker": True, "chars": len("나는 토니 스타크야. 슈트는 오늘도 완벽해.")}
    bot = answer_stats("저는 AI 언어 모델입니다. 我是助手", ended=False)
    assert bot["persona_break"] and bot["has_han"] and not bot["persona_marker"]
    assert bot["hangul_share"] == pytest.approx(9 / (9 + 2 + 4))  # 9 Hangul, 2 Latin, 4 Han letters
    assert answer_stats("As an AI, I cannot.", True)["persona_break"]
    assert not answer_stats("AI 얘기라면 자비스가 전문이지.", True)["persona_break"]
    summary = summarise([tony, bot])
    assert summary["eot_rate"] == 0.5 and summary["han_rate"] == 0.5 and summary["persona_break_rate"] == 0.5


BREAKS = ["저는 AI 어시스턴트입니다", "저는 Qwen입니다. 알리바바 클라우드에서 만든 대규모 언어 모델입니다.",
          "저는 대형 언어 모델입니다", "나는 그냥 AI야", "저는 인공지능 비서예요", "저는 OpenAI에서 만든 AI 모델입니다",
          "저는 AI로서 답할게요", "언어 모델로서 말씀드리면", "I'm an AI assistant", "I am a large language model",
          "I'm Claude, an AI assistant", "As an AI, I cannot."]
IN_PERSONA = ["자비스는 내 AI 비서야", "프라이데이는 AI 어시스턴트야", "FRIDAY는 AI 어시스턴트예요", "발전 AI 기술은 끝이 없지",
              "완전 인공지능 시대야", "이전 AI 모델은 느렸어", "안전 프로그램을 돌려", "도전 챗봇이라니", "나는 프로그램을 짜는 천재야",
              "내가 AI 연구를 좀 했지", "난 AI를 만들었지", "제가 인공지능에 대해 말씀드리면", "전 AI가 싫어", "나는 아이언맨이야",
              "I'm building an AI", "I am Iron Man", "자비스는 내가 만든 AI야.", "자비스? 내가 직접 설계한 인공지능 비서야.",
              "자비스는 전 세계 최고의 AI 비서야.", "프라이데이는 내가 만든 최고의 AI 어시스턴트입니다."]


def test_persona_break_means_the_answer_calling_itself_an_ai():
    assert [t for t in BREAKS if not answer_stats(t, True)["persona_break"]] == []
    assert [t for t in IN_PERSONA if answer_stats(t, True)["persona_break"]] == []


def test_persona_markers_are_whole_words_with_their_particles():
    marked = ["토니가 왔다", "나는 토니스타크", "아이언 맨 슈트를 입고", "어벤저스 회의", "JARVIS, 준비해", "아크 원자로 가동",
              "Tony Stark here", "슈트로 날아가", "슈트로는 부족해", "토니라고 불러", "자비스라면 알 거야"]
    unmarked = ["멜로디가 좋네요", "페퍼민트 차", "스타크래프트 게임", "안토니오", "천재적인 발상", "원자로 안전 점검",
                "페퍼로니 피자가 최고지", "슈트라우스의 왈츠"]
    assert [t for t in marked if not answer_stats(t, True)["persona_marker"]] == []
    assert [t for t in unmarked if answer_stats(t, True)["persona_marker"]] == []


def test_answers_without_letters_do_not_count_in_the_hangul_share():
    empty, korean = answer_stats("", True), answer_stats("안녕", True)
    assert empty["hangul_share"] is None and summarise([empty, korean])["hangul_share"] == 1.0
    assert summarise([])["eot_rate"] is None


def test_markdown_rows_hold_answers_as_text():
    from ironman_nb.compare import _markdown

    text = _markdown([{"prompt": "첫 줄\r\n둘째 줄", "before": "<details>숨김", "after": "a | b"}],
                     {"base_model": "b", "tuned_model": "t", "eval_nll_difference": None})
    assert text.splitlines()[-1] == "| 1 | 첫 줄<br>둘째 줄 | &lt;details&gt;숨김 | a \\| b |"


def test_cut_off_hangul_is_trimmed():
    assert clean_answer("완벽하\ufffd") == "완벽하"


def test_paired_bootstrap_interval_brackets_the_difference():
    before = [(10.0, 5), (8.0, 4), (12.0, 6), (9.0, 5), (10.0, 5)]
    after = [(7.0, 5), (6.0, 4), (9.0, 6), (7.5, 5), (8.0, 5)]
    result = paired_bootstrap(before, after, samples=500)
    assert result["difference"] == pytest.approx((37.5 - 49.0) / 25)
    low, high = result["ci95"]
    assert low <= result["difference"] <= high < 0
    # Each side's mean over its own token counts, as metrics.json reports eval_nll (another tokenizer or template
    # on one side gives other counts): 2.0 → 1.5 here, not (27 − 30) / 15.
    other = paired_bootstrap([(10.0, 5), (20.0, 10)], [(9.0, 6), (18.0, 12)], samples=200)
    assert other["difference"] == pytest.approx(1.5 - 2.0)
    # Two samples give three possible means, one a zero-width "interval": no interval below five.
    assert other["ci95"] is None


def test_compare_writes_every_output(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in ["안녕?", "슈트 자랑해 봐"]), encoding="utf-8")
    from conftest import write_chat_data

    data = write_chat_data(tmp_path / "data", train_rows=1, eval_rows=3)
    result = compare(CompareConfig(base_model=str(tiny_model_dir), tuned_model=str(tiny_model_dir), prompts_path=str(prompts),
                                   eval_data=str(data / "eval.jsonl"), output_dir=str(tmp_path / "out"), max_new_tokens=8))
    out = tmp_path / "out"
    for name in ("comparison.jsonl", "comparison.md", "comparison.html", "metrics.json", "metrics.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(l) for l in (out / "comparison.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["안녕?", "슈트 자랑해 봐"] and "after_stats" in rows[0]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["before"]["eval_nll"] == pytest.approx(metrics["after"]["eval_nll"])  # same model both sides
    assert metrics["eval_nll_difference"]["difference"] == pytest.approx(0.0, abs=1e-6)
    assert '<meta charset="utf-8">' in (out / "comparison.html").read_text(encoding="utf-8")
    assert "슈트 자랑해 봐" in (out / "comparison.md").read_text(encoding="utf-8")
    assert list(result.metrics_table().index)[:2] == ["eval_nll", "eot_rate"]


def test_prompts_without_a_prompt_field_are_refused(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"question": "no"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl, record 2: needs a non-empty 'prompt'"):
        compare(CompareConfig(base_model=str(tiny_model_dir), tuned_model=str(tiny_model_dir), prompts_path=str(prompts),
                              eval_data="", output_dir=str(tmp_path / "out")))


def test_a_missing_eval_file_is_an_error_not_a_comparison_without_nll(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n')
    with pytest.raises(FileNotFoundError, match=r"eval_data .*eval_typo.jsonl: not found .*set eval_data = ''"):
        compare(CompareConfig(base_model=str(tiny_model_dir), tuned_model=str(tiny_model_dir), prompts_path=str(prompts),
                              eval_data=str(tmp_path / "eval_typo.jsonl"), output_dir=str(tmp_path / "out")))


def test_an_adapter_folder_as_tuned_model_is_refused_before_the_base_side_runs(tmp_path, monkeypatch):
    import ironman_nb.compare as compare_module
    from ironman_nb.models import ModelNotFoundError

    monkeypatch.setattr(compare_module, "_side", lambda *a, **k: pytest.fail("the base side ran first"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="is an adapter folder .*merged model folder of notebook 04"):
        compare(CompareConfig(tuned_model=str(adapter), prompts_path=str(prompts), eval_data="",
                              output_dir=str(tmp_path / "out")))


def test_vllm_path_uses_the_chat_template_greedy_and_the_stop_tokens(monkeypatch, tokenizer, tmp_path):
    """vLLM is CUDA-only: a stand-in module records what the vLLM path asks of it."""
    import sys
    import types

    import torch

    from ironman_nb.compare import generate_answers_vllm

    calls = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            calls["params"] = kwargs

    class Choice:
        def __init__(self, text, reason):
            self.text, self.finish_reason = text, reason

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def generate(self, texts, params):
            calls["texts"] = texts
            return [types.SimpleNamespace(outputs=[Choice("나야, 토니.", "stop")]),
                    types.SimpleNamespace(outputs=[Choice("끝까지 못 했\ufffd", "length")])]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    # Another kernel holds 50 of the card's 80 GiB: vLLM is asked for 90 % of the 30 left, not more than is free.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (30 * 2**30, 80 * 2**30))
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    answers = generate_answers_vllm(str(model_dir), tokenizer, ["누구야?", "길게 말해"], DEFAULT_SYSTEM_PROMPT, 32, "bf16")
    assert answers == [("나야, 토니.", True), ("끝까지 못 했", False)]
    # No generation_config.json: no repetition penalty, as transformers' generate would use none.
    assert calls["params"] == {"temperature": 0.0, "max_tokens": 32, "stop_token_ids": [2], "repetition_penalty": 1.0}
    assert calls["engine"]["dtype"] == "bfloat16" and calls["engine"]["enable_prefix_caching"] is True
    assert calls["engine"]["gpu_memory_utilization"] == pytest.approx(0.9 * 30 / 80, abs=1e-3)
    # Token ids, not text: vLLM adds no second BOS to them (it would to the text of a template that starts with one).
    assert calls["texts"][0] == {"prompt_token_ids": tokenizer.apply_chat_template(
        [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": "누구야?"}],
        tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]}
    # The model's own repetition penalty, which transformers' generate applies by itself (Qwen2-Instruct: 1.05).
    # And its own stop tokens too (Qwen2-Instruct stops at <|endoftext|> as well as <|im_end|>).
    (model_dir / "generation_config.json").write_text('{"repetition_penalty": 1.05, "eos_token_id": [2, 0]}')
    generate_answers_vllm(str(model_dir), tokenizer, ["누구야?", "길게 말해"], DEFAULT_SYSTEM_PROMPT, 32, "bf16")
    assert calls["params"]["repetition_penalty"] == 1.05 and calls["params"]["stop_token_ids"] == [2, 0]


@pytest.mark.parametrize("device, cudnn_attention", [("cuda", False), ("cuda", True), ("cpu", False)])
def test_generation_and_nll_keep_sdpa_off_cudnn_on_a_gpu(monkeypatch, device, cudnn_attention):
    """On a GPU both sides of the comparison generate and score with cuDNN's attention kernels off (their CPU cost
    per call, as in training) unless `cudnn_attention`; on a CPU the backends are left alone."""
    import torch

    import ironman_nb.compare as compare_module

    def cudnn_allowed(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return []

    seen = []
    model = torch.nn.Linear(1, 1)
    monkeypatch.setattr(compare_module, "load_tokenizer", lambda name: None)
    monkeypatch.setattr(compare_module, "load_model", lambda *args: model)
    monkeypatch.setattr(compare_module, "generate_answers", cudnn_allowed)
    monkeypatch.setattr(compare_module, "assistant_nll", cudnn_allowed)
    monkeypatch.setattr(compare_module, "vllm_available", lambda device: False)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    compare_module._side("base", ["prompt"], [{"messages": []}], CompareConfig(cudnn_attention=cudnn_attention),
                         device, "bf16")
    assert seen == [device != "cuda" or cudnn_attention] * 2 and torch.backends.cuda.cudnn_sdp_enabled() == before


def test_each_side_of_the_comparison_releases_its_model(tiny_model_dir, tmp_path, model_release_watch):
    """The base model is gone before the tuned one loads (or vLLM, which starts only where the memory is free)."""
    import ironman_nb.compare as compare_module

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "누구야?"}\n', encoding="utf-8")
    model_release_watch.watch(compare_module)
    compare(CompareConfig(base_model=str(tiny_model_dir), tuned_model=str(tiny_model_dir), prompts_path=str(prompts),
                          eval_data="", output_dir=str(tmp_path / "out"), max_new_tokens=4))
    assert len(model_release_watch.loaded) == 2 and model_release_watch.alive == [0, 0, 0]


def test_a_failing_vllm_falls_back_to_transformers_generation(monkeypatch, tokenizer, caplog):
    """vLLM refuses to start where less than its share of the card is free; the comparison goes on without it."""
    import sys
    import types

    import torch

    import ironman_nb.compare as compare_module

    class LLM:
        def __init__(self, **kwargs):
            raise RuntimeError("Engine core initialization failed. See root cause above.\nmore")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=dict))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (30 * 2**30, 80 * 2**30))
    monkeypatch.setattr(compare_module, "vllm_available", lambda device: True)
    monkeypatch.setattr(compare_module, "load_tokenizer", lambda name: tokenizer)
    monkeypatch.setattr(compare_module, "load_model", lambda *args: torch.nn.Linear(1, 1))
    monkeypatch.setattr(compare_module, "generate_answers", lambda *args: [("나야, 토니.", True)])
    answers, _ = compare_module._side("base", ["누구야?"], [], CompareConfig(), "cuda", "bf16")
    assert answers == [("나야, 토니.", True)]
    assert ("vLLM could not generate with base (RuntimeError: Engine core initialization failed. See root cause "
            "above.); generating with transformers instead") in caplog.text


def test_vllm_answers_without_held_out_data_load_no_second_copy(monkeypatch, tokenizer):
    """With eval_data "" there is nothing to score after vLLM answered: the transformers model is not loaded."""
    import ironman_nb.compare as compare_module

    monkeypatch.setattr(compare_module, "vllm_available", lambda device: True)
    monkeypatch.setattr(compare_module, "load_tokenizer", lambda name: tokenizer)
    monkeypatch.setattr(compare_module, "generate_answers_vllm", lambda *args: [("나야, 토니.", True)])
    monkeypatch.setattr(compare_module, "load_model", lambda *args: pytest.fail("loaded a second copy"))
    assert compare_module._side("base", ["누구야?"], [], CompareConfig(), "cuda", "bf16") == ([("나야, 토니.", True)], [])


def test_the_metrics_chart_labels_values_and_says_what_was_not_measured():
    """No eval data: an NLL panel that says so (it drew an empty panel with ticks around zero); a rate with
    nothing to average reads n/a, a rate of zero reads 0 %."""
    from ironman_nb.compare import metrics_figure

    answers = {"eot_rate": 0.0, "hangul_share": None, "persona_break_rate": 0.25, "mean_chars": 80.0}
    metrics = {"before": {"eval_nll": None, "answers": answers}, "after": {"eval_nll": None, "answers": answers}}
    rates, nll = metrics_figure(metrics).axes
    assert [t.get_text() for t in nll.texts] == ["not measured\n(no held-out data)"]
    assert [t.get_text() for t in rates.texts] == ["0 %", "n/a", "25 %"] * 2
    metrics["after"]["eval_nll"], metrics["before"]["eval_nll"] = 1.5, 2.25
    rates, nll = metrics_figure(metrics).axes
    assert [t.get_text() for t in nll.texts] == ["2.250", "1.500"]
