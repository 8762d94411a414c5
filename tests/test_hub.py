"""Notebook 06 (push to Hub) with a stand-in HfApi: no network, no real token."""
from __future__ import annotations

import ast
import inspect
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from ironman_nb.config import DEFAULT_SYSTEM_PROMPT, EMBEDDED_MODEL, ConfigError, PushConfig
from ironman_nb.hub import HubError, is_transient, push_to_hub, run_failure, upload_files

FAKE_TOKEN = "hf_" + "FakeToken0123456789abcdefXYZ"
REPO = "tester/SmolLM2-Ironman-ko"

ALLOWED = [
    "README.md", "added_tokens.json", "chat_template.jinja", "config.json", "generation_config.json",
    "merges.txt", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    "training_curves.png", "vocab.json",
]


def http_error(code: int) -> HfHubHTTPError:
    response = SimpleNamespace(status_code=code, headers={}, request=None)
    return HfHubHTTPError(f"{code} Client Error", response=response)


class StandInError(Exception):
    """Not a huggingface_hub class: only `.response.status_code`."""

    def __init__(self, code):
        super().__init__(f"HTTP {code}")
        self.response = SimpleNamespace(status_code=code)


class FakeHfApi:
    """Records every call; `failures[name]` lists exceptions to raise before succeeding. `remote` is the repository's
    file list, `card_data` what model_info reports for any model. Each call must fit the real HfApi method."""

    def __init__(self, private_on_hub: bool = True, failures: dict | None = None, remote=(".gitattributes",),
                 card_data=None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.private_on_hub = private_on_hub
        self.failures = {k: list(v) for k, v in (failures or {}).items()}
        self.remote = list(remote)
        self.card_data = card_data
        self.committed: list[str] = []
        self.deleted: list[str] = []

    def _record(self, name, args, kwargs):
        inspect.signature(getattr(HfApi, name)).bind(self, *args, **kwargs)  # TypeError when the real one would fail
        self.calls.append((name, args, kwargs))
        pending = self.failures.get(name)
        if pending:
            raise pending.pop(0)

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", args, kwargs)
        return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

    def repo_info(self, *args, **kwargs):
        self._record("repo_info", args, kwargs)
        return SimpleNamespace(private=self.private_on_hub)

    def list_repo_files(self, *args, **kwargs):
        self._record("list_repo_files", args, kwargs)
        return list(self.remote)

    def model_info(self, *args, **kwargs):
        self._record("model_info", args, kwargs)
        return SimpleNamespace(id=args[0], card_data=self.card_data)

    def create_commit(self, *args, **kwargs):
        self._record("create_commit", args, kwargs)
        operations = kwargs["operations"]
        assert all(isinstance(op, (CommitOperationAdd, CommitOperationDelete)) for op in operations)
        self.committed = [op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)]
        self.deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
        return SimpleNamespace(commit_url="https://huggingface.co/commit/abc")

    def upload_folder(self, *args, **kwargs):  # not used: would upload by patterns
        self._record("upload_folder", args, kwargs)

    @property
    def names(self):
        return [name for name, _, _ in self.calls]


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as the pipeline leaves it, with a merged model full of things not to upload."""
    run = tmp_path / "run"
    merged = run / "merged"
    merged.mkdir(parents=True)
    for name in ("model.safetensors",):
        (merged / name).write_bytes(b"\0" * 1234)
    (merged / "config.json").write_text(json.dumps({"_name_or_path": "/cache/models/SmolLM2-135M-Instruct"}))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "added_tokens.json"):
        (merged / name).write_text("{}")
    (merged / "merges.txt").write_text("#version: 0.2\n")
    (merged / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    # junk that must never leave the machine
    (merged / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (merged / "checkpoints" / "checkpoint-1" / "optimizer.pt").write_bytes(b"opt")
    (merged / "checkpoints" / "checkpoint-1" / "model.safetensors").write_bytes(b"old")
    (merged / "training_args.bin").write_bytes(b"args")
    (merged / "02_train.ipynb").write_text("{}")
    (merged / ".hidden").write_text("secret")
    (merged / "pytorch_model.bin").write_bytes(b"bin")
    (merged / "sub").mkdir()
    (merged / "sub" / "config.json").write_text("{}")

    (run / "adapter").mkdir()
    (run / "adapter" / "run_config.json").write_text(json.dumps({
        "config": {"base_model": EMBEDDED_MODEL, "learning_rate": 1e-4, "num_train_epochs": 2.0, "lora_r": 8,
                   "precision": "auto", "gradient_checkpointing": "auto", "padding_free": "off",
                   "data_dir": "/home/someone/private/data"},
        "resolved": {"base_model_hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "precision": "fp32",
                     "gradient_checkpointing": False, "padding_free": False, "device": "cpu",
                     "system_prompt": DEFAULT_SYSTEM_PROMPT, "train_samples": 24, "eval_samples": 4},
        "result": {"global_step": 6, "train_loss": 2.5, "eval_loss_before": 3.1234, "eval_loss_after": 2.0123},
    }, ensure_ascii=False))
    (run / "plots").mkdir()
    (run / "plots" / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (run / "compare").mkdir()
    rows = [{"prompt": f"질문 {i}", "before": f"평범한 답 {i}", "after": f"나야, 토니 스타크 | {i}"} for i in range(7)]
    (run / "compare" / "comparison.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    answers = {"eot_rate": 0.5, "hangul_share": 0.91234, "han_rate": 0.125, "persona_break_rate": 0.25,
               "persona_marker_rate": 0.1, "mean_chars": 123.456}
    (run / "compare" / "metrics.json").write_text(json.dumps({  # as compare.py writes it
        "base_model": EMBEDDED_MODEL, "tuned_model": "/home/someone/runs/lab/merged", "prompts": 7, "eval_samples": 4,
        "max_new_tokens": 256,
        "before": {"eval_nll": 2.345678, "answers": answers},
        "after": {"eval_nll": 1.234567, "answers": {**answers, "persona_marker_rate": 0.875, "mean_chars": 98.7}},
        "eval_nll_difference": {"difference": -1.111111, "ci95": [-1.254321, -0.987654], "bootstrap_samples": 1000},
        "lexicons": {"persona_markers": ["LEXICONWORD"], "persona_break_pattern": "LEXICONPATTERN"},
    }, ensure_ascii=False))
    return run


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: FAKE_TOKEN)
    return FAKE_TOKEN


def cfg(run_dir: Path, **overrides) -> PushConfig:
    params = {"model_dir": str(run_dir / "merged"), "repo_id": REPO, "dry_run": False, **overrides}
    return PushConfig.from_params(**params)


def no_sleep(log):
    return log.append


# ------------------------------------------------------------------------------------------ config

def test_config_defaults_and_repo_id_checks():
    assert PushConfig.from_params().to_dict() == PushConfig.defaults()
    assert PushConfig.defaults()["dry_run"] is True and PushConfig.defaults()["private"] is True
    with pytest.raises(ConfigError, match=r"PushConfig.repo_id: is required when dry_run is False"):
        PushConfig.from_params(dry_run=False)
    for bad in ("just-a-name", "a/b/c", "owner/name with space", "owner/-bad", "https://huggingface.co/owner/name"):
        with pytest.raises(ConfigError, match=r"PushConfig.repo_id"):
            PushConfig.from_params(repo_id=bad)
    # ids that only huggingface_hub's own check refuses, with its reason
    with pytest.raises(ConfigError, match=r"PushConfig.repo_id: huggingface_hub rejects it: Repo_id cannot end by '.git'"):
        PushConfig.from_params(repo_id="me/model.git")
    with pytest.raises(ConfigError, match=r"PushConfig.repo_id: huggingface_hub rejects it: .*maximum length is 96"):
        PushConfig.from_params(repo_id="me/" + "a" * 97)
    assert PushConfig.from_params(repo_id="your-name/Qwen2-7B-Ironman-ko", dry_run=False).repo_id


def test_config_refuses_a_token_as_any_value():
    with pytest.raises(ConfigError, match="looks like a Hugging Face access token"):
        PushConfig.from_params(commit_message=f"upload {FAKE_TOKEN}")
    with pytest.raises(ConfigError, match="unknown parameter 'token'"):
        PushConfig.from_params(token=FAKE_TOKEN)


# ------------------------------------------------------------------------------------------ upload

def test_uploads_only_allowlisted_files_in_order(run_dir, token):
    api = FakeHfApi()
    result = push_to_hub(cfg(run_dir), api=api, sleep=no_sleep([]))
    # the base's license is known offline (KNOWN_LICENSES), so model_info is not called
    assert api.names == ["create_repo", "repo_info", "list_repo_files", "create_commit"]
    (_, args, kwargs) = api.calls[0]
    assert args == (REPO,) and kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert api.calls[1][1] == (REPO,) and api.calls[2][1] == (REPO,)
    commit = api.calls[3][2]
    assert commit["repo_id"] == REPO and commit["commit_message"] == PushConfig.defaults()["commit_message"]
    assert api.committed == ALLOWED and api.deleted == [] and result.removed == []
    assert [name for name, _ in result.files] == ALLOWED
    assert result.uploaded and result.url == f"https://huggingface.co/{REPO}"
    for junk in ("optimizer.pt", "training_args.bin", "02_train.ipynb", ".hidden", "pytorch_model.bin", "checkpoints"):
        assert not any(junk in name for name in api.committed)
    assert "sub/config.json" not in api.committed


def test_public_repo_stops_the_upload_when_private_was_asked(run_dir, token):
    api = FakeHfApi(private_on_hub=False)
    with pytest.raises(HubError, match=rf"{REPO} is public.*nothing was uploaded"):
        push_to_hub(cfg(run_dir), api=api, sleep=no_sleep([]))
    assert api.names == ["create_repo", "repo_info"]


def test_public_upload_reports_the_real_visibility(run_dir, token, capsys):
    api = FakeHfApi(private_on_hub=False)
    push_to_hub(cfg(run_dir, private=False), api=api, sleep=no_sleep([]))
    assert api.names == ["create_repo", "repo_info", "list_repo_files", "create_commit"]
    assert api.calls[0][2]["private"] is False
    assert f"to {REPO} (public)" in capsys.readouterr().out
    # an existing private repository stays private: the printout says so instead of "(public)"
    api = FakeHfApi(private_on_hub=True)
    result = push_to_hub(cfg(run_dir, private=False), api=api, sleep=no_sleep([]))
    out = capsys.readouterr().out
    assert result.uploaded and "(public)" not in out
    assert f"to {REPO} (private)" in out and "stays private" in out


def test_transient_errors_are_retried_with_backoff(run_dir, token):
    sleeps = []
    api = FakeHfApi(failures={"create_commit": [http_error(429), http_error(503)]})
    result = push_to_hub(cfg(run_dir), api=api, sleep=no_sleep(sleeps))
    assert api.names == ["create_repo", "repo_info", "list_repo_files", "create_commit", "create_commit", "create_commit"]
    assert sleeps == [2.0, 4.0]
    assert result.uploaded


def test_stand_in_errors_and_connection_errors_are_classified():
    assert is_transient(StandInError(502)) and is_transient(StandInError(429))
    assert not is_transient(StandInError(404)) and not is_transient(StandInError(401))
    assert is_transient(ConnectionError("reset")) and is_transient(TimeoutError())
    assert not is_transient(ValueError("x"))


def test_retries_give_up_after_five_tries(run_dir, token):
    sleeps = []
    api = FakeHfApi(failures={"create_repo": [ConnectionError("down")] * 5})
    with pytest.raises(HubError, match=r"create_repo failed 5 times \(ConnectionError"):
        push_to_hub(cfg(run_dir), api=api, sleep=no_sleep(sleeps))
    assert api.names == ["create_repo"] * 5 and sleeps == [2.0, 4.0, 8.0, 16.0]


@pytest.mark.parametrize("error", [http_error(401), StandInError(401)])
def test_unauthorized_is_not_retried(run_dir, token, error):
    sleeps = []
    api = FakeHfApi(failures={"create_repo": [error]})
    with pytest.raises(HubError, match=r"refused the access token \(HTTP 401.*hf auth login"):
        push_to_hub(cfg(run_dir), api=api, sleep=no_sleep(sleeps))
    assert api.names == ["create_repo"] and sleeps == []


def test_forbidden_is_not_retried_and_names_the_owner(run_dir, token):
    api = FakeHfApi(failures={"create_commit": [http_error(403)]})
    with pytest.raises(HubError, match=r"may not write to 'tester/.*HTTP 403"):
        push_to_hub(cfg(run_dir), api=api, sleep=no_sleep([]))
    assert api.names == ["create_repo", "repo_info", "list_repo_files", "create_commit"]


def test_offline_mode_is_not_retried(run_dir, token, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    sleeps = []
    api = FakeHfApi(failures={"create_repo": [OfflineModeIsEnabled("offline")]})
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(cfg(run_dir), api=api, sleep=no_sleep(sleeps))
    assert api.names == ["create_repo"] and sleeps == []
    # the real client is not even built while offline mode is on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 is set"):
        push_to_hub(cfg(run_dir))


def test_no_token_raises_before_any_call(run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    api = FakeHfApi()
    with pytest.raises(HubError, match=r"no Hugging Face access token.*hf auth login.*HF_TOKEN"):
        push_to_hub(cfg(run_dir), api=api, sleep=no_sleep([]))
    assert api.calls == []


def test_dry_run_calls_nothing_and_lists_files_with_sizes(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: pytest.fail("dry run must not look up the token"))
    api = FakeHfApi()
    result = push_to_hub(PushConfig.from_params(model_dir=str(run_dir / "merged")), api=api)
    assert api.calls == []
    assert not result.uploaded and result.url is None
    merged = run_dir / "merged"
    assert result.files == [(name, (merged / name).stat().st_size) for name in ALLOWED]
    assert dict(result.files)["model.safetensors"] == 1234
    table = result.listing()
    assert list(table.index) == ALLOWED and table.loc["model.safetensors", "bytes"] == 1234
    assert "dry run" in capsys.readouterr().out


def test_card_front_matter_sections_and_no_token_anywhere(run_dir, token, capsys):
    import yaml

    api = FakeHfApi()
    result = push_to_hub(cfg(run_dir), api=api, sleep=no_sleep([]))
    merged = run_dir / "merged"
    card = (merged / "README.md").read_text(encoding="utf-8")
    assert card == result.card
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "finetune" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and meta["language"] == ["ko"]
    assert meta["license"] == "apache-2.0"
    assert {"lora", "sft", "persona", "ironman_nb"} <= set(meta["tags"])
    for heading in ("## Persona system prompt", "## Training configuration", "## Training curves",
                    "## Before and after fine-tuning", "## Usage", "## Limitations"):
        assert heading in card
    assert DEFAULT_SYSTEM_PROMPT in card
    assert "(training_curves.png)" in card and (merged / "training_curves.png").is_file()
    assert "3.123" in card and "2.012" in card  # eval loss before / after
    assert "auto → fp32" in card
    assert "질문 4" in card and "질문 5" not in card  # first 5 rows only
    assert "토니 스타크 \\| 0" in card  # pipes escaped inside table cells
    # metrics: a rounded before/after table and the NLL change with its interval; no local paths, no lexicons
    assert "| held-out assistant NLL (`eval_nll`, lower is better) | 2.346 | 1.235 |" in card
    assert "| answers with Tony Stark words (`persona_marker_rate`) | 10 % | 88 % |" in card
    assert "| Hangul share of the letters (`hangul_share`) | 91 % | 91 % |" in card
    assert "| mean answer length (characters) (`mean_chars`) | 123 | 99 |" in card
    assert "-1.111, 95 % interval -1.254 … -0.988" in card
    assert "7 prompts answered, 4 held-out samples scored" in card
    for leaked in ("/home/someone", "LEXICONWORD", "LEXICONPATTERN", "tuned_model", "0.91234", "2.345678"):
        assert leaked not in card
    assert "apply_chat_template" in card and "AutoModelForCausalLM" in card and REPO in card
    usage = card.split("```python\n")[1].split("```")[0]
    ast.parse(usage)  # the usage example is valid Python
    assert "Marvel" in card and "Disney" in card
    assert "/home/someone" not in card
    # the token is nowhere: not in the card, not in any file, not in what was printed
    for path in merged.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    assert FAKE_TOKEN not in capsys.readouterr().out


def test_the_notebooks_card_preview_shows_the_front_matter_as_yaml_and_the_chart_inline(run_dir):
    """Rendered as Markdown, front matter runs into the text, and the chart's relative link points at nothing
    beside the notebook."""
    import base64

    import yaml

    result = push_to_hub(PushConfig.from_params(model_dir=str(run_dir / "merged")), api=FakeHfApi())
    preview = result.card_preview()
    assert preview.startswith("```yaml\n") and not preview.startswith("---")
    front = preview.split("```yaml\n")[1].split("\n```")[0]
    assert yaml.safe_load(front)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    chart = base64.b64encode((run_dir / "merged" / "training_curves.png").read_bytes()).decode()
    assert f"](data:image/png;base64,{chart})" in preview and "](training_curves.png)" not in preview
    assert preview.split("\n```\n\n", 1)[1] == result.card.split("---\n", 2)[2].lstrip("\n").replace(
        "](training_curves.png)", f"](data:image/png;base64,{chart})")


def test_adapter_card_uses_peft_and_local_base_license(tmp_path, token):
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: llama3\n---\n# base\n")
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"w" * 10)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (adapter / "trainer_state.json").write_text("{}")
    api = FakeHfApi()
    result = push_to_hub(PushConfig.from_params(model_dir=str(adapter), repo_id=REPO, dry_run=False), api=api,
                         sleep=no_sleep([]))
    assert api.committed == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = result.card
    assert "license: llama3" in card and "library_name: peft" in card
    assert "base_model:" not in card  # a local folder is no Hub id
    assert "AutoPeftModelForCausalLM" in card and "apply_chat_template" in card
    ast.parse(card.split("```python\n")[1].split("```")[0])
    # every run file is missing: the card says so instead of failing
    assert card.count("not available") + card.count("Not available") >= 4


def test_failed_run_is_refused(run_dir, token, capsys):
    (run_dir / "status.json").write_text(json.dumps({"stages": {
        "01_prepare_data": {"status": "done"},
        "02_train_lora": {"status": "failed", "error": "NonFiniteTrainingError: loss nan"},
    }}))
    api = FakeHfApi()
    with pytest.raises(HubError, match=r"refusing to upload.*02_train_lora failed"):
        push_to_hub(cfg(run_dir), api=api, sleep=no_sleep([]))
    assert api.calls == [] and not (run_dir / "merged" / "README.md").exists()
    # a dry run still lists the files but says the run failed
    result = push_to_hub(cfg(run_dir, dry_run=True), api=api)
    assert api.calls == [] and result.files and "02_train_lora" in result.run_failed
    assert "this run failed" in capsys.readouterr().out


def test_run_config_marked_failed_is_refused(run_dir, token):
    path = run_dir / "adapter" / "run_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "failed": True}))
    with pytest.raises(HubError, match="marks the training as failed"):
        push_to_hub(cfg(run_dir), api=FakeHfApi(), sleep=no_sleep([]))


def test_missing_model_dir_and_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(HubError, match="not found: run notebook 04"):
        push_to_hub(PushConfig.from_params(model_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HubError, match=r"no \*\.safetensors weights"):
        push_to_hub(PushConfig.from_params(model_dir=str(tmp_path / "empty")))
    assert upload_files(tmp_path / "empty") == []


# ------------------------------------------------------------------------------ re-upload, metadata

def test_reupload_removes_the_files_of_an_earlier_upload_in_the_same_commit(run_dir, token, capsys):
    # An adapter was uploaded to the repository first, then an older single-file merge; the user added notes.
    remote = [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "model.safetensors",
              "model-00001-of-00002.safetensors", "model.safetensors.index.json", "training_curves.png",
              "additional_chat_templates/old.jinja", "notes.txt", "eval/results.json", "checkpoint-1/model.safetensors"]
    api = FakeHfApi(remote=remote)
    result = push_to_hub(cfg(run_dir), api=api, sleep=no_sleep([]))
    stale = ["adapter_config.json", "adapter_model.safetensors", "additional_chat_templates/old.jinja",
             "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    assert api.names.count("create_commit") == 1  # deletions and additions land together
    assert api.deleted == stale and result.removed == stale
    assert api.committed == ALLOWED  # model.safetensors, README.md and the chart are replaced, not deleted
    assert api.calls[2][2] == {"repo_type": "model"}
    out = capsys.readouterr().out
    assert "removing 5 files of an earlier upload" in out and "adapter_config.json" in out
    # a dry run cannot see the repository, so it says what the upload will do, calling nothing
    dry_api = FakeHfApi(remote=remote)
    dry = push_to_hub(cfg(run_dir, dry_run=True), api=dry_api)
    assert dry_api.calls == [] and dry.removed == []
    assert "also removes the files of an earlier upload" in capsys.readouterr().out


def test_extra_chat_templates_are_uploaded(run_dir, token, capsys):
    templates = run_dir / "merged" / "additional_chat_templates"
    templates.mkdir()
    (templates / "tool_use.jinja").write_text("{{ tools }}")
    (templates / "notes.txt").write_text("not a template")
    api = FakeHfApi()
    result = push_to_hub(cfg(run_dir), api=api, sleep=no_sleep([]))
    assert "additional_chat_templates/tool_use.jinja" in api.committed
    assert "additional_chat_templates/notes.txt" not in api.committed
    assert dict(result.files)["additional_chat_templates/tool_use.jinja"] == len("{{ tools }}")
    assert "additional_chat_templates" not in capsys.readouterr().out  # not listed as left out


def qwen_merged(tmp_path) -> Path:
    merged = tmp_path / "run" / "merged"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"w")
    (merged / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2-7B-Instruct"}))
    return merged


def test_license_of_a_hub_base_is_read_from_its_card_on_the_hub(tmp_path, token, capsys):
    import yaml

    merged = qwen_merged(tmp_path)
    card_data = ModelCardData(license="other", license_name="tongyi-qianwen",
                              license_link="https://huggingface.co/Qwen/Qwen2-7B-Instruct/blob/main/LICENSE")
    api = FakeHfApi(card_data=card_data)
    result = push_to_hub(PushConfig.from_params(model_dir=str(merged), repo_id=REPO, dry_run=False), api=api,
                         sleep=no_sleep([]))
    assert api.names[0] == "model_info" and api.calls[0][1] == ("Qwen/Qwen2-7B-Instruct",)
    meta = yaml.safe_load(result.card.split("---\n")[1])
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", "tongyi-qianwen", "https://huggingface.co/Qwen/Qwen2-7B-Instruct/blob/main/LICENSE")
    assert "License: `other` (tongyi-qianwen, https://huggingface.co/Qwen" in result.card
    assert result.warnings == []
    api = FakeHfApi(card_data=ModelCardData(license="apache-2.0"))
    card = push_to_hub(PushConfig.from_params(model_dir=str(merged), repo_id=REPO, dry_run=False), api=api,
                       sleep=no_sleep([])).card
    assert "license: apache-2.0" in card and "license_name" not in card
    capsys.readouterr()
    # a failed look-up does not stop the upload: the card falls back to `other` and the result says why
    api = FakeHfApi(failures={"model_info": [http_error(404)]})
    result = push_to_hub(PushConfig.from_params(model_dir=str(merged), repo_id=REPO, dry_run=False), api=api,
                         sleep=no_sleep([]))
    assert result.uploaded and "license: other" in result.card
    assert len(result.warnings) == 1 and "could not read the license of Qwen/Qwen2-7B-Instruct" in result.warnings[0]
    assert "HTTP 404" in result.warnings[0] and "warning: could not read the license" in capsys.readouterr().out
    # a card without a license also falls back
    result = push_to_hub(PushConfig.from_params(model_dir=str(merged), repo_id=REPO, dry_run=False),
                         api=FakeHfApi(card_data=None), sleep=no_sleep([]))
    assert "license: other" in result.card and "names no license" in result.warnings[0]


def test_unknown_hub_base_gets_license_other(tmp_path, capsys):
    merged = qwen_merged(tmp_path)
    card = push_to_hub(PushConfig.from_params(model_dir=str(merged))).card
    assert "base_model: Qwen/Qwen2-7B-Instruct" in card and "license: other" in card
    assert "the upload reads it from the base model's card on the Hub" in capsys.readouterr().out


def test_merged_folder_from_another_adapter_uses_its_own_facts(run_dir, token):
    # run/merged was merged from another run's adapter (Qwen); run/adapter is this run's (SmolLM2), and failed.
    other = run_dir.parent / "other-run" / "adapter"
    other.mkdir(parents=True)
    (other / "run_config.json").write_text(json.dumps({
        "config": {"base_model": "Qwen/Qwen2-7B-Instruct", "learning_rate": 0.000321},
        "resolved": {"base_model_hub_id": "Qwen/Qwen2-7B-Instruct", "system_prompt": "다른 어댑터의 프롬프트"},
    }, ensure_ascii=False))
    merged = run_dir / "merged"
    (merged / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2-7B-Instruct"}))
    (merged / "ironman_nb.json").write_text(json.dumps({
        "base_model": "Qwen/Qwen2-7B-Instruct", "base_model_hub_id": "Qwen/Qwen2-7B-Instruct",
        "adapter_dir": str(other.resolve()), "system_prompt": "병합 폴더의 프롬프트",
    }, ensure_ascii=False))
    this_run = run_dir / "adapter" / "run_config.json"
    this_run.write_text(json.dumps({**json.loads(this_run.read_text()), "failed": True}))
    assert run_failure(merged) is None  # this run's failed training did not make the merged model
    result = push_to_hub(cfg(run_dir), api=FakeHfApi(card_data=ModelCardData(license="apache-2.0")),
                         sleep=no_sleep([]))
    card = result.card
    assert "base_model: Qwen/Qwen2-7B-Instruct" in card and "SmolLM2" not in card.split("---\n")[1]
    assert "| learning_rate | 0.000321 |" in card  # the other adapter's run_config.json
    assert "병합 폴더의 프롬프트" in card and DEFAULT_SYSTEM_PROMPT not in card
    # the adapter it records decides whether the run failed
    (other / "run_config.json").write_text(json.dumps({"failed": True, "error": "loss nan"}))
    assert "other-run/adapter/run_config.json marks the training as failed" in run_failure(merged)
    # the recorded adapter is gone (the folders were moved): the run folder's run_config.json is read, but the
    # merged folder's own ironman_nb.json still names the base and the prompt
    shutil.rmtree(other)
    this_run.write_text(json.dumps({k: v for k, v in json.loads(this_run.read_text()).items() if k != "failed"}))
    card = push_to_hub(cfg(run_dir, dry_run=True)).card
    assert "base_model: Qwen/Qwen2-7B-Instruct" in card and "병합 폴더의 프롬프트" in card
    assert "| learning_rate | 0.0001 |" in card


def test_only_the_stages_that_made_the_model_can_fail_it(run_dir):
    merged, adapter = run_dir / "merged", run_dir / "adapter"
    (merged / "ironman_nb.json").write_text(json.dumps({"base_model": EMBEDDED_MODEL}))

    def status(**stages):
        (run_dir / "status.json").write_text(json.dumps({"stages": {
            name: {"status": state, "error": "boom"} for name, state in stages.items()}}))

    # plots, comparison or an earlier upload failing changes nothing in the weights
    status(**{"01_prepare_data": "done", "02_train_lora": "done", "03_plot_training": "failed",
              "04_merge_lora": "done", "05_compare": "failed", "06_push_to_hub": "failed"})
    assert run_failure(merged) is None and run_failure(adapter) is None
    # a failed merge blocks the merged folder, not the adapter (merge.py asks before re-running 04)
    status(**{"02_train_lora": "done", "04_merge_lora": "failed"})
    assert "04_merge_lora failed" in run_failure(merged) and run_failure(adapter) is None
    (merged / "ironman_nb.json").unlink()  # not a merged folder of notebook 04: 04 does not count
    assert run_failure(merged) is None
    for stage in ("01_prepare_data", "02_train_lora"):
        status(**{stage: "failed"})
        assert f"{stage} failed" in run_failure(merged) and f"{stage} failed" in run_failure(adapter)
    # interrupted (the runner got SIGTERM), or left "running" by a killed run: the adapter may be an earlier one
    status(**{"02_train_lora": "interrupted"})
    assert "02_train_lora interrupted" in run_failure(adapter)
    status(**{"02_train_lora": "running"})
    assert "02_train_lora did not finish" in run_failure(adapter)


def test_auth_errors_say_where_the_token_came_from(run_dir, token, monkeypatch):
    with pytest.raises(HubError) as err:
        push_to_hub(cfg(run_dir), api=FakeHfApi(failures={"create_repo": [http_error(401)]}), sleep=no_sleep([]))
    text = str(err.value)
    assert "came from the HF_TOKEN environment variable" in text and "unset it" in text
    assert FAKE_TOKEN not in text
    # without HF_TOKEN the token is the stored login: log in again
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    with pytest.raises(HubError) as err:
        push_to_hub(cfg(run_dir), api=FakeHfApi(failures={"create_commit": [http_error(403)]}), sleep=no_sleep([]))
    text = str(err.value)
    assert "HTTP 403" in text and "came from the login stored by `hf auth login`" in text
    assert "run `hf auth login` again" in text and "HF_TOKEN environment variable" not in text
    assert FAKE_TOKEN not in text


def test_adapter_naming_a_local_base_is_uploaded_with_a_warning(tmp_path, token, capsys):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"w" * 10)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/my-llama"}))
    params = {"model_dir": str(adapter), "repo_id": REPO, "dry_run": False}
    result = push_to_hub(PushConfig.from_params(**params), api=FakeHfApi(), sleep=no_sleep([]))
    assert result.uploaded and len(result.warnings) == 1
    assert "base_model_name_or_path is '/models/my-llama', not a Hub id" in result.warnings[0]
    assert "warning:" in capsys.readouterr().out
    assert push_to_hub(PushConfig.from_params(**{**params, "dry_run": True})).warnings == result.warnings
    # an adapter naming a Hub id gets no warning
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen2-7B-Instruct"}))
    api = FakeHfApi(card_data=ModelCardData(license="apache-2.0"))
    assert push_to_hub(PushConfig.from_params(**params), api=api, sleep=no_sleep([])).warnings == []
