"""Read a sheet (CSV, XLSX, JSON, JSONL or a Google Sheets link), validate it, and write the
Alpaca file, the LLaMA-Factory registry entry, the chat-format train/eval split and a report.

Every dropped or changed row is reported with its spreadsheet row number and the reason.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import datetime as _dt
import difflib
import io
import json
import random
import re
import tempfile
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .config import PrepareConfig
from .io import atomic_write_json, atomic_write_jsonl, read_jsonl

REQUIRED_COLUMNS = ("instruction", "output")
KNOWN_COLUMNS = ("instruction", "input", "output", "system", "category")
SHEETS_URL = re.compile(r"https://docs\.google\.com/spreadsheets/d/([A-Za-z0-9_-]+)")


class DataError(ValueError):
    """The input sheet cannot be used as it is; the message names the file, row or column."""


@dataclasses.dataclass
class Table:
    source: str
    columns: list[str]
    rows: list[dict[str, str]]
    row_numbers: list[int]  # what the user sees: spreadsheet row (header = 1) or JSONL line
    row_label: str = "row"
    sheet: str | None = None
    delimiter: str | None = None


# ---------------------------------------------------------------- reading

def sheets_export_url(url: str) -> str | None:
    """A Google Sheets share link → its CSV export URL (keeps the tab's gid); None for other strings."""
    match = SHEETS_URL.match(url.strip())
    if not match:
        return None
    gid = re.search(r"[#&?]gid=(\d+)", url)
    return f"https://docs.google.com/spreadsheets/d/{match.group(1)}/export?format=csv" + (f"&gid={gid.group(1)}" if gid else "")


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).upper()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    return str(value)


def _normalise_header(header: list[Any], source: str) -> list[str]:
    columns = [_cell_text(h).strip().lower().lstrip("\ufeff") for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        found = [c for c in columns if c]
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, found, n=1, cutoff=0.6)
            if close:
                hints.append(f"{close[0]!r} → {name!r}?")
        raise DataError(
            f"{source}: missing column(s) {', '.join(map(repr, missing))}. "
            f"Expected columns: instruction, input, output (optional: system, category); found: {found or 'none'}"
            + (f". Misspelled? {' '.join(hints)}" if hints else "")
        )
    return columns


def _decode(raw: bytes, source: str) -> str:
    if raw.startswith(codecs.BOM_UTF16_LE) or raw.startswith(codecs.BOM_UTF16_BE):
        return raw.decode("utf-16")
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{source}, line {line}: byte 0x{raw[err.start]:02x} is not UTF-8. "
            "Save the file as UTF-8 (Excel: 'CSV UTF-8 (Comma delimited)'; Google Sheets exports UTF-8)."
        ) from None


def _read_csv(path: Path, source: str) -> Table:
    text = _decode(path.read_bytes(), source)
    if not text.strip():
        raise DataError(f"{source}: the file is empty")
    first_line = text.split("\n", 1)[0]
    # The delimiter that splits the header into the expected columns wins; a sheet saved with ';' or tabs works too.
    delimiter = max(",;\t|", key=lambda d: sum(c.strip().lower() in KNOWN_COLUMNS for c in first_line.split(d)))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader)
    columns = _normalise_header(header, source)
    rows, numbers = [], []
    for number, record in enumerate(reader, start=2):
        if len(record) > len(columns) and any(v.strip() for v in record[len(columns):]):
            raise DataError(
                f"{source}, row {number}: {len(record)} cells but the header has {len(columns)} columns "
                f"(delimiter {delimiter!r}); quote cells that contain the delimiter"
            )
        rows.append({c: (record[i] if i < len(record) else "") for i, c in enumerate(columns) if c})
        numbers.append(number)
    return Table(source, columns, rows, numbers, "row", delimiter=delimiter)


def _read_xlsx(path: Path, source: str, sheet: str) -> Table:
    import openpyxl

    try:
        # data_only=False: a cell holding a formula stays the formula's text, never its cached value.
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=False)
    except Exception as err:  # openpyxl raises several unrelated types for a broken file
        raise DataError(f"{source}: not a readable .xlsx workbook ({type(err).__name__}: {err})") from err
    try:
        names = workbook.sheetnames
        if sheet:
            if sheet not in names:
                raise DataError(f"{source}: no sheet named {sheet!r}; sheets: {names}")
            candidates = [sheet]
        else:
            candidates = names
        problems = []
        for name in candidates:
            rows_iter = workbook[name].iter_rows(values_only=True)
            header = next(rows_iter, None)
            if header is None:
                problems.append(f"sheet {name!r} is empty")
                continue
            try:
                columns = _normalise_header(list(header), f"{source} [sheet {name!r}]")
            except DataError as err:
                if sheet:
                    raise
                problems.append(str(err))
                continue
            rows, numbers = [], []
            for number, values in enumerate(rows_iter, start=2):
                values = list(values)
                rows.append({c: _cell_text(values[i] if i < len(values) else None) for i, c in enumerate(columns) if c})
                numbers.append(number)
            return Table(source, columns, rows, numbers, "row", sheet=name)
        raise DataError(f"{source}: no sheet has the columns instruction and output. " + "; ".join(problems))
    finally:
        workbook.close()


def _records_table(records: list[Any], numbers: list[int], source: str, label: str) -> Table:
    for record, number in zip(records, numbers):
        if not isinstance(record, dict):
            raise DataError(f"{source}, {label} {number}: expected an object with instruction/input/output, got {type(record).__name__}")
    keys = sorted({k for r in records for k in r}, key=lambda k: (k not in KNOWN_COLUMNS, k))
    columns = _normalise_header(keys, source)
    rows = [{c: _cell_text(r.get(k)) for k, c in zip(keys, columns)} for r in records]
    return Table(source, columns, rows, numbers, label)


def _read_json(path: Path, source: str) -> Table:
    text = _decode(path.read_bytes(), source)
    if not text.strip():
        raise DataError(f"{source}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of records (Alpaca format), got {type(data).__name__}")
    return _records_table(data, list(range(1, len(data) + 1)), source, "record")


def _read_jsonl(path: Path, source: str) -> Table:
    text = _decode(path.read_bytes(), source)
    records, numbers = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{source}, line {number}: not valid JSON ({err.msg})") from None
        numbers.append(number)
    if not records:
        raise DataError(f"{source}: the file is empty")
    return _records_table(records, numbers, source, "line")


def read_sheet(input_path: str, sheet: str = "") -> Table:
    """Read any supported input into a Table of text cells with the user's row numbers."""
    url = sheets_export_url(input_path)
    if url:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "sheet.csv"
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    target.write_bytes(response.read())
            except OSError as err:
                raise DataError(
                    f"{input_path}: could not download the sheet ({err}). Share it as 'Anyone with the link', "
                    "or download it as CSV/XLSX and give the file path."
                ) from err
            table = _read_csv(target, input_path)
        return table
    path = Path(input_path).expanduser()
    if not path.is_file():
        raise DataError(f"input_path {input_path!r}: file not found (working directory: {Path.cwd()})")
    if path.stat().st_size == 0:
        raise DataError(f"{input_path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return _read_csv(path, input_path)
    if suffix in (".xlsx", ".xlsm"):
        return _read_xlsx(path, input_path, sheet)
    if suffix == ".json":
        return _read_json(path, input_path)
    if suffix == ".jsonl":
        return _read_jsonl(path, input_path)
    raise DataError(f"{input_path}: unsupported file type {suffix!r}; use .csv, .xlsx, .json, .jsonl or a Google Sheets link")


# ---------------------------------------------------------------- cleaning

def _clean_text(value: str) -> str:
    # Trim the ends, keep internal newlines, unify line endings and non-breaking spaces.
    return value.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ").strip()


def _dedupe_key(*values: str) -> str:
    return "\x1f".join(" ".join(v.split()) for v in values)


def user_content(instruction: str, input_text: str) -> str:
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def chat_messages(record: dict, system_prompt: str) -> list[dict]:
    """Alpaca record → system/user/assistant messages: the one place the prompt is assembled."""
    return [
        {"role": "system", "content": record.get("system") or system_prompt},
        {"role": "user", "content": user_content(record["instruction"], record.get("input", ""))},
        {"role": "assistant", "content": record["output"]},
    ]


def prompt_messages(prompt: str, system_prompt: str) -> list[dict]:
    """The system and user turns for a question to answer (generation, probes): the training prompt, no answer."""
    return chat_messages({"instruction": prompt, "input": "", "output": ""}, system_prompt)[:-1]


def render_lengths(tokenizer, conversations: list[list[dict]], chunk: int = 1024) -> list[int]:
    """Token count of each conversation after the chat template, in chunks (memory stays per chunk)."""
    lengths = []
    for start in range(0, len(conversations), chunk):
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in conversations[start:start + chunk]]
        lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return lengths


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids of the rendered chat, with labels only on the final assistant turn (its end-of-turn token included)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer; cannot mask the prompt")
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [tok if start >= len(prompt) else -100 for tok, (start, _) in zip(ids, encoded["offset_mapping"])]
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def _truncate_output(tokenizer, messages: list[dict], max_length: int) -> str | None:
    """The longest prefix of the answer that fits in max_length tokens, cut at a word boundary when possible."""
    answer = messages[-1]["content"]
    lo, hi = 0, len(answer)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = messages[:-1] + [{"role": "assistant", "content": answer[:mid]}]
        if render_lengths(tokenizer, [trial])[0] <= max_length:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    cut = answer[:lo]
    space = cut.rfind(" ")
    return (cut[:space] if space > lo // 2 else cut).rstrip()


@dataclasses.dataclass
class Prepared:
    records: list[dict]  # kept rows: instruction, input, output, system, category, row
    report: dict
    table: Table


def clean_table(table: Table, cfg: PrepareConfig, tokenizer=None) -> Prepared:
    """Drop blank, incomplete, duplicate and over-long rows; report each with its row number."""
    dropped, changed, records = [], [], []
    seen: dict[str, int] = {}
    label = table.row_label
    for raw, number in zip(table.rows, table.row_numbers):
        row = {c: _clean_text(raw.get(c, "")) for c in KNOWN_COLUMNS}
        trimmed = [c for c in KNOWN_COLUMNS if raw.get(c, "") and row[c] != raw.get(c, "")]
        if not any(row.values()) and not any(v.strip() for v in raw.values()):
            dropped.append({label: number, "reason": "blank"})
            continue
        if not row["instruction"]:
            dropped.append({label: number, "reason": "missing instruction"})
            continue
        if not row["output"]:
            dropped.append({label: number, "reason": "missing output"})
            continue
        key = _dedupe_key(row["instruction"], row["input"], row["output"])
        if key in seen:
            dropped.append({label: number, "reason": f"duplicate of {label} {seen[key]}"})
            continue
        seen[key] = number
        if trimmed:
            changed.append({label: number, "change": f"trimmed whitespace in {', '.join(trimmed)}"})
        records.append({**row, "row": number})

    lengths: list[int] = []
    if tokenizer is not None and records:
        conversations = [chat_messages(r, cfg.system_prompt) for r in records]
        lengths = render_lengths(tokenizer, conversations)
        kept, kept_lengths = [], []
        for record, messages, length in zip(records, conversations, lengths):
            if length <= cfg.max_length:
                kept.append(record)
                kept_lengths.append(length)
                continue
            where = f"{table.source}, {label} {record['row']}"
            if cfg.over_length == "stop":
                raise DataError(
                    f"{where}: {length} tokens after the chat template, over max_length={cfg.max_length}. "
                    "Shorten the output, raise max_length, or set over_length='drop' or 'truncate'."
                )
            if cfg.over_length == "truncate":
                shorter = _truncate_output(tokenizer, messages, cfg.max_length)
                if shorter:
                    record = {**record, "output": shorter}
                    new_length = render_lengths(tokenizer, [chat_messages(record, cfg.system_prompt)])[0]
                    changed.append({label: record["row"], "change": f"output truncated from {length} to {new_length} tokens"})
                    kept.append(record)
                    kept_lengths.append(new_length)
                    continue
            dropped.append({label: record["row"], "reason": f"over the length limit ({length} > {cfg.max_length} tokens)"})
        records, lengths = kept, kept_lengths

    reasons = Counter(d["reason"].split(" of ")[0] if d["reason"].startswith("duplicate") else d["reason"].split(" (")[0] for d in dropped)
    report = {
        "input_path": table.source,
        "sheet": table.sheet,
        "delimiter": table.delimiter,
        "columns": [c for c in table.columns if c],
        "rows_read": len(table.rows),
        "rows_kept": len(records),
        "dropped_by_reason": dict(reasons),
        "dropped": sorted(dropped, key=lambda d: d[label]),
        "changed": sorted(changed, key=lambda d: d[label]),
        "max_length": cfg.max_length,
        "over_length": cfg.over_length,
        "token_lengths": (
            {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)} if lengths else None
        ),
    }
    if not records:
        raise DataError(
            f"{table.source}: no usable row — {len(table.rows)} read, all dropped "
            f"({', '.join(f'{k}: {v}' for k, v in reasons.items()) or 'no data rows'}). See the reasons above; nothing was written."
        )
    return Prepared(records, report, table)


def split_by_question(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole questions (instruction + input), stratified by category, so none is in both splits."""
    if eval_fraction <= 0:
        return list(records), []
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[_dedupe_key(record["instruction"], record["input"])].append(record)
    by_category: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        by_category[members[0].get("category", "")].append(key)
    rng = random.Random(seed)
    eval_keys: set[str] = set()
    for category in sorted(by_category):
        keys = sorted(by_category[category])
        rng.shuffle(keys)
        count = round(len(keys) * eval_fraction)
        eval_keys.update(keys[:count])
    if not eval_keys and len(groups) >= 2:
        eval_keys.add(rng.choice(sorted(groups)))
    if len(eval_keys) == len(groups):
        eval_keys.discard(sorted(eval_keys)[0])
    train = [r for r in records if _dedupe_key(r["instruction"], r["input"]) not in eval_keys]
    held_out = [r for r in records if _dedupe_key(r["instruction"], r["input"]) in eval_keys]
    return train, held_out


# ---------------------------------------------------------------- writing

@dataclasses.dataclass
class PrepareResult:
    output_dir: Path
    report: dict
    files: dict[str, Path]

    def summary(self):
        """A small table for the notebook: counts and lengths."""
        import pandas as pd

        r = self.report
        rows = [
            ("rows read", r["rows_read"]),
            ("rows kept", r["rows_kept"]),
            *[(f"dropped: {reason}", count) for reason, count in r["dropped_by_reason"].items()],
            ("rows changed", len(r["changed"])),
            ("train rows", r["train_rows"]),
            ("eval rows", r["eval_rows"]),
        ]
        if r["token_lengths"]:
            rows += [(f"tokens per sample ({k})", v) for k, v in r["token_lengths"].items()]
        if r.get("categories"):
            rows += [(f"category: {k}", v) for k, v in r["categories"].items()]
        # object dtype: counts stay integers in the rendered table (a float column shows "650.0")
        return pd.DataFrame(rows, columns=["item", "value"], dtype=object).set_index("item")

    def issues(self):
        """Dropped and changed rows with their row numbers and reasons."""
        import pandas as pd

        entries = [{**d, "action": "dropped", "detail": d["reason"]} for d in self.report["dropped"]]
        entries += [{**c, "action": "changed", "detail": c["change"]} for c in self.report["changed"]]
        frame = pd.DataFrame(entries)
        if frame.empty:
            return pd.DataFrame(columns=["action", "detail"])
        key = next(k for k in ("row", "line", "record") if k in frame.columns)
        return frame[[key, "action", "detail"]].sort_values(key).reset_index(drop=True)

    def preview(self, count: int = 3):
        """The first training samples' messages, one row per message."""
        import pandas as pd

        records = read_jsonl(self.files["train.jsonl"])[:count]
        rows = [(i, m["role"], m["content"]) for i, r in enumerate(records) for m in r["messages"]]
        return pd.DataFrame(rows, columns=["sample", "role", "content"]).set_index(["sample", "role"])


def prepare(cfg: PrepareConfig, tokenizer=None) -> PrepareResult:
    """Read, clean, split and write. Nothing is written unless every check passed."""
    table = read_sheet(cfg.input_path, cfg.sheet)
    if tokenizer is None:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(cfg.base_model)
    prepared = clean_table(table, cfg, tokenizer)
    train, held_out = split_by_question(prepared.records, cfg.eval_fraction, cfg.seed)

    out = Path(cfg.output_dir)
    alpaca = [
        {"instruction": r["instruction"], "input": r["input"], "output": r["output"], "system": r["system"] or cfg.system_prompt}
        for r in prepared.records
    ]

    def chat(r: dict) -> dict:
        return {"messages": chat_messages(r, cfg.system_prompt), "category": r["category"], "row": r["row"]}

    report = {
        **prepared.report,
        "train_rows": len(train),
        "eval_rows": len(held_out),
        "categories": dict(sorted(Counter(r["category"] for r in prepared.records if r["category"]).items())),
        "eval_fraction": cfg.eval_fraction,
        "seed": cfg.seed,
        "system_prompt": cfg.system_prompt,
        "base_model": cfg.base_model,
    }
    files = {
        "ironman.json": out / "ironman.json",
        "dataset_info.json": out / "dataset_info.json",
        "train.jsonl": out / "train.jsonl",
        "eval.jsonl": out / "eval.jsonl",
        "data_report.json": out / "data_report.json",
    }
    atomic_write_json(files["ironman.json"], alpaca)
    # LLaMA-Factory's registry entry for an Alpaca file (its `dataset_info.json` format).
    atomic_write_json(
        files["dataset_info.json"],
        {"ironman": {"file_name": "ironman.json", "formatting": "alpaca",
                     "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}}},
    )
    atomic_write_jsonl(files["train.jsonl"], [chat(r) for r in train])
    atomic_write_jsonl(files["eval.jsonl"], [chat(r) for r in held_out])
    atomic_write_json(files["data_report.json"], report)  # last: its presence means the folder is complete
    return PrepareResult(out, report, files)


def load_chat_records(path: str | Path, what: str) -> list[dict]:
    """Chat records written by `prepare` (or by hand: one {"messages": [...]} object per line)."""
    records = read_jsonl(path, what)
    for number, record in enumerate(records, start=1):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"{path}, record {number}: needs 'messages' ending with an assistant message")
    return records
