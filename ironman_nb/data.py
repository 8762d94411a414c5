"""Read a sheet (CSV, XLSX, JSON, JSONL or a Google Sheets link), validate it, and write the
Alpaca file, the LLaMA-Factory registry entry, the chat-format train/eval split and a report.

Every dropped or changed row is reported with its spreadsheet row number and the reason.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import random
import re
import tempfile
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .config import PrepareConfig, closest_name
from .io import atomic_write_json, atomic_write_jsonl, read_jsonl

REQUIRED_COLUMNS = ("instruction", "output")
KNOWN_COLUMNS = ("instruction", "input", "output", "system", "category")
# A Google Sheets link: a shared sheet (…/spreadsheets/d/<id>/…, also …/u/0/d/<id>/…) or one published to the web
# (…/spreadsheets/d/e/<published id>/pub or /pubhtml); http:// or no scheme at all is accepted too.
SHEETS_URL = re.compile(
    r"(?:https?://)?docs\.google\.com/spreadsheets/(?:u/\d+/)?d/(?P<published>e/)?(?P<id>[A-Za-z0-9_-]+)", re.IGNORECASE
)
URL_LIKE = re.compile(r"[a-z][a-z0-9+.-]*://|docs\.google\.com/", re.IGNORECASE)
HANGUL_SYLLABLE = re.compile("[\uac00-\ud7a3]")


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
    encoding: str | None = None  # of a text file: utf-8, utf-8-sig, utf-16 or cp949
    history_turns: dict[int, int] = dataclasses.field(default_factory=dict)  # row number → earlier turns not used


# ---------------------------------------------------------------- reading

def sheets_export_url(url: str) -> str | None:
    """A Google Sheets link → the URL of its CSV (keeps the tab's gid); None for other strings."""
    match = SHEETS_URL.match(url.strip())
    if not match:
        return None
    gid = re.search(r"[#&?]gid=(\d+)", url)
    if match.group("published"):
        # "Publish to web" links have their own id and serve CSV at /pub, not /export.
        return (f"https://docs.google.com/spreadsheets/d/e/{match.group('id')}/pub?output=csv"
                + (f"&gid={gid.group(1)}&single=true" if gid else ""))
    return f"https://docs.google.com/spreadsheets/d/{match.group('id')}/export?format=csv" + (f"&gid={gid.group(1)}" if gid else "")


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


def _column_name(header_cell: Any) -> str:
    return _cell_text(header_cell).lstrip("\ufeff").strip().lower()


def _normalise_header(header: list[Any], source: str) -> list[str]:
    columns = [_column_name(h) for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        found = [c for c in columns if c]
        hints = []
        for name in missing:
            close = closest_name(name, found)
            if close:
                hints.append(f"{close!r} → {name!r}?")
        raise DataError(
            f"{source}: missing column(s) {', '.join(map(repr, missing))}. "
            f"Expected columns: instruction, input, output (optional: system, category); found: {found or 'none'}"
            + (f". Misspelled? {' '.join(hints)}" if hints else "")
        )
    return columns


def _refuse_duplicate_columns(header: list[Any], columns: list[str], source: str) -> None:
    """Two header cells that mean the same column ("output" and "Output"): which one holds the data is unclear."""
    first_position: dict[str, int] = {}
    for position, name in enumerate(columns):
        if name in KNOWN_COLUMNS and name in first_position:
            from openpyxl.utils import get_column_letter

            first = first_position[name]
            raise DataError(
                f"{source}: two columns mean {name!r}: column {first + 1} ({get_column_letter(first + 1)}, "
                f"{_cell_text(header[first])!r}) and column {position + 1} ({get_column_letter(position + 1)}, "
                f"{_cell_text(header[position])!r}). Delete or rename one, so that it is clear which to use."
            )
        first_position.setdefault(name, position)


def _decode(raw: bytes, source: str, korean_fallback: bool = False) -> tuple[str, str]:
    """The text of a file and the encoding it was read with; Korean Excel's cp949 only where korean_fallback."""
    if raw.startswith(codecs.BOM_UTF16_LE) or raw.startswith(codecs.BOM_UTF16_BE):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as err:
            line = raw[: err.start].decode("utf-16", errors="replace").count("\n") + 1
            raise DataError(
                f"{source}, line {line}: the UTF-16 text is cut off or damaged at byte {err.start} ({err.reason}). "
                "Save the file again, preferably as UTF-8 (Excel: 'CSV UTF-8 (Comma delimited)')."
            ) from None
    encoding = "utf-8"
    if raw.startswith(codecs.BOM_UTF8):
        raw, encoding = raw[len(codecs.BOM_UTF8):], "utf-8-sig"
    try:
        return raw.decode("utf-8"), encoding
    except UnicodeDecodeError as err:
        if korean_fallback:
            # Korean Excel's default "CSV (쉼표로 분리)" is cp949; accepted only when every byte decodes and the
            # text has Hangul, so a file in another legacy encoding is not misread as Korean.
            try:
                text = raw.decode("cp949")
            except UnicodeDecodeError:
                text = ""
            if HANGUL_SYLLABLE.search(text):
                return text, "cp949"
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{source}, line {line}: byte 0x{raw[err.start]:02x} is not UTF-8. "
            "Save the file as UTF-8 (Excel: 'CSV UTF-8 (Comma delimited)'; Google Sheets exports UTF-8)."
        ) from None


def _first_record(text: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    except csv.Error:
        return []


def _read_csv(raw: bytes, source: str) -> Table:
    text, encoding = _decode(raw, source, korean_fallback=True)
    if not text.strip():
        raise DataError(f"{source}: the file is empty")
    # The delimiter that splits the header into the expected columns wins; a sheet saved with ';' or tabs works too.
    # The header is parsed as CSV, so quoted names ("instruction";"output") count.
    delimiter = max(",;\t|", key=lambda d: sum(_column_name(c) in KNOWN_COLUMNS for c in _first_record(text, d)))
    # strict: a quote that is never closed, or text after a closing quote, stops with the row instead of
    # silently running the following rows into one cell.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    columns: list[str] | None = None
    rows, numbers = [], []
    record_start = 1  # the line where the record being read begins
    try:
        for record in reader:
            if columns is None:
                columns = _normalise_header(record, source)
                _refuse_duplicate_columns(record, columns, source)
            else:
                number = len(numbers) + 2
                if len(record) > len(columns) and any(v.strip() for v in record[len(columns):]):
                    raise DataError(
                        f"{source}, row {number}: {len(record)} cells but the header has {len(columns)} columns "
                        f"(delimiter {delimiter!r}); quote cells that contain the delimiter"
                    )
                rows.append({c: (record[i] if i < len(record) else "") for i, c in enumerate(columns) if c})
                numbers.append(number)
            record_start = reader.line_num + 1
    except csv.Error as err:
        row = len(numbers) + 2 if columns is not None else 1
        raise DataError(
            f"{source}, row {row} (line {record_start}, read up to line {reader.line_num}): not valid CSV ({err}). "
            'Most likely a cell opens a quote (") that is never closed, or has text after its closing quote. '
            'Close the quote; a quote inside a cell is written as two ("") in a quoted cell.'
        ) from None
    return Table(source, columns, rows, numbers, "row", delimiter=delimiter, encoding=encoding)


def _formula_text(value: Any) -> Any:
    """Array and data-table formulas as the text Excel shows (plain formulas already arrive as text)."""
    from openpyxl.worksheet.formula import ArrayFormula, DataTableFormula

    if isinstance(value, ArrayFormula):
        return value.text
    if isinstance(value, DataTableFormula):
        # Excel shows {=TABLE(row input, column input)}; a one-input table has only the one its dtr flag names.
        def flag(attribute):  # XML attributes arrive as "1"/"true" text
            return str(attribute).lower() in ("1", "true")

        if flag(value.dt2D):
            inputs = (value.r1, value.r2)
        else:
            inputs = (value.r1, None) if flag(value.dtr) else (None, value.r1)
        return f"=TABLE({','.join(i or '' for i in inputs)})"
    return value


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
            worksheet = workbook[name]
            # A file whose stored <dimension> is stale would be cut short in read-only mode; read to the last row.
            worksheet.reset_dimensions()
            rows_iter = worksheet.iter_rows(values_only=True)
            header, header_row = next(rows_iter, None), 1
            # The header is the first row with anything in it (a sheet often starts a row or two down).
            while header is not None and all(v is None or str(v).strip() == "" for v in header):
                header, header_row = next(rows_iter, None), header_row + 1
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
            _refuse_duplicate_columns(list(header), columns, f"{source} [sheet {name!r}]")
            rows, numbers = [], []
            for number, values in enumerate(rows_iter, start=header_row + 1):
                values = [_formula_text(v) for v in values]
                rows.append({c: _cell_text(values[i] if i < len(values) else None) for i, c in enumerate(columns) if c})
                numbers.append(number)
            return Table(source, columns, rows, numbers, "row", sheet=name)
        raise DataError(f"{source}: no sheet has the columns instruction and output. " + "; ".join(problems))
    finally:
        workbook.close()


def _json_text(value: Any, where: str, key: str) -> str:
    """A JSON value of a used field as cell text: null and NaN are empty; objects and lists are refused."""
    if isinstance(value, (dict, list)):
        kind = "an object" if isinstance(value, dict) else "a list"
        raise DataError(
            f"{where}: {key!r} holds {kind}, not text. Put plain text in instruction, input, output, system and "
            "category (flatten or join nested values before preparing)."
        )
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return _cell_text(value)


def _records_table(records: list[Any], numbers: list[int], source: str, label: str, encoding: str) -> Table:
    rows: list[dict[str, str]] = []
    history_turns: dict[int, int] = {}
    columns: dict[str, None] = {}  # every record's column names, in first-seen order
    for record, number in zip(records, numbers):
        where = f"{source}, {label} {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with instruction/input/output, got {type(record).__name__}")
        # Each record's keys are matched on their own: merged files may spell them "instruction" and "Instruction".
        row: dict[str, str] = {}
        keys: dict[str, str] = {}
        for key, value in record.items():
            name = _column_name(key)
            if name in keys and name in KNOWN_COLUMNS:
                raise DataError(f"{where}: keys {keys[name]!r} and {key!r} both mean {name!r}; keep one")
            keys[name] = key
            if name == "history":
                # LLaMA-Factory's alpaca "history": earlier turns, which this project does not train on.
                if isinstance(value, list) and value:
                    history_turns[number] = len(value)
                continue
            row[name] = _json_text(value, where, key) if name in KNOWN_COLUMNS else _cell_text(value)
            columns.setdefault(name, None)
        rows.append(row)
    names = [c for c in KNOWN_COLUMNS if c in columns] + sorted(c for c in columns if c not in KNOWN_COLUMNS)
    return Table(source, _normalise_header(names, source), rows, numbers, label, encoding=encoding,
                 history_turns=history_turns)


def _read_json(path: Path, source: str) -> Table:
    text, encoding = _decode(path.read_bytes(), source)
    if not text.strip():
        raise DataError(f"{source}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of records (Alpaca format), got {type(data).__name__}")
    return _records_table(data, list(range(1, len(data) + 1)), source, "record", encoding)


def _read_jsonl(path: Path, source: str) -> Table:
    text, encoding = _decode(path.read_bytes(), source)
    records, numbers = [], []
    # Lines end at "\n" only: str.splitlines() would also split at U+2028, U+2029 and U+0085, which JSON
    # strings may hold unescaped (json.dumps(..., ensure_ascii=False) writes them as they are).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{source}, line {number}: not valid JSON ({err.msg})") from None
        numbers.append(number)
    if not records:
        raise DataError(f"{source}: the file is empty")
    return _records_table(records, numbers, source, "line", encoding)


def _download_sheet(url: str, input_path: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            content_type = getattr(response, "headers", {}).get("Content-Type", "")
            body = response.read()
    except OSError as err:
        raise DataError(
            f"{input_path}: could not download the sheet ({err}). Share it as 'Anyone with the link', "
            "or download it as CSV/XLSX and give the file path."
        ) from err
    # A sheet that is not shared answers with Google's sign-in page, not with CSV.
    if content_type.lower().startswith("text/html") or body.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"<"):
        raise DataError(
            f"{input_path}: Google sent a web page (a sign-in page), not the sheet's CSV: the sheet is not shared "
            "with everyone who has the link. In Google Sheets: Share → General access → 'Anyone with the link' "
            "(Viewer); a 'Publish to web' link must still be published. Or download it as CSV/XLSX and give the file path."
        )
    return body


def read_sheet(input_path: str, sheet: str = "") -> Table:
    """Read any supported input into a Table of text cells with the user's row numbers."""
    url = sheets_export_url(input_path)
    if url:
        return _read_csv(_download_sheet(url, input_path), input_path)
    if URL_LIKE.match(input_path.strip()):
        raise DataError(
            f"{input_path}: not a Google Sheets link this tool can read (it reads docs.google.com/spreadsheets/… links). "
            "Download the file (CSV, XLSX, JSON or JSONL) and give its path."
        )
    path = Path(input_path).expanduser()
    if not path.is_file():
        # A link without its scheme that was taken for a relative path (the runner resolves paths) lands here.
        hint = "; a Google Sheets link must start with https://" if "docs.google.com/" in input_path else ""
        raise DataError(f"input_path {input_path!r}: file not found (working directory: {Path.cwd()}){hint}")
    if path.stat().st_size == 0:
        raise DataError(f"{input_path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return _read_csv(path.read_bytes(), input_path)
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


def _length_parts(tokenizer, record: dict, system_prompt: str) -> dict[str, int]:
    """Tokens of a sample by part: system prompt (with the chat template's own tokens), question, answer."""
    empty_question = {**record, "instruction": "", "input": "", "output": ""}
    empty_answer = {**record, "output": ""}
    system, up_to_question, total = render_lengths(
        tokenizer, [chat_messages(r, system_prompt) for r in (empty_question, empty_answer, record)]
    )
    return {"system prompt": system, "question": up_to_question - system, "answer": total - up_to_question}


LENGTH_ADVICE = {
    "system prompt": "Shorten system_prompt (or this row's system cell)",
    "question": "Shorten the instruction/input",
    "answer": "Shorten the output",
}


def _rows_text(label: str, numbers: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, numbers[:limit])) + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")
    return f"{label}{'s' if len(numbers) > 1 else ''} {shown}"


def _system_prompt_note(report: dict) -> str | None:
    """When rows went over max_length and the system prompt takes half of it or more, that is the cause to name."""
    tokens, limit = report["system_prompt_tokens"], report["max_length"]
    if not report["dropped_by_reason"].get("over the length limit") or tokens is None or tokens < limit / 2:
        return None
    return (f"The system prompt with the chat template alone is {tokens} tokens of max_length={limit}, leaving "
            f"{max(limit - tokens, 0)} for the question and answer: raise max_length or shorten system_prompt.")


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
    system_prompt_tokens = None
    if tokenizer is not None:
        # What every sample spends before its question: the persona prompt inside the chat template.
        system_prompt_tokens = _length_parts(
            tokenizer, {"instruction": "", "input": "", "output": ""}, cfg.system_prompt)["system prompt"]
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
                parts = _length_parts(tokenizer, record, cfg.system_prompt)
                longest = max(parts, key=parts.get)
                raise DataError(
                    f"{where}: {length} tokens after the chat template, over max_length={cfg.max_length} "
                    f"({', '.join(f'{part} {tokens}' for part, tokens in parts.items())}). "
                    f"{LENGTH_ADVICE[longest]}, raise max_length, or set over_length='drop' or 'truncate'."
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

    def reason_kind(reason: str) -> str:
        return reason.split(" of ")[0] if reason.startswith("duplicate") else reason.split(" (")[0]

    reasons = Counter(reason_kind(d["reason"]) for d in dropped)
    history_not_used = [{label: r["row"], "turns": table.history_turns[r["row"]]} for r in records
                        if r["row"] in table.history_turns]
    report = {
        "input_path": table.source,
        "sheet": table.sheet,
        "delimiter": table.delimiter,
        "encoding": table.encoding,
        "columns": [c for c in table.columns if c],
        "rows_read": len(table.rows),
        "rows_kept": len(records),
        "dropped_by_reason": dict(reasons),
        "dropped": sorted(dropped, key=lambda d: d[label]),
        "changed": sorted(changed, key=lambda d: d[label]),
        "history_not_used": history_not_used,
        "max_length": cfg.max_length,
        "over_length": cfg.over_length,
        "system_prompt_tokens": system_prompt_tokens,
        "token_lengths": (
            {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)} if lengths else None
        ),
    }
    if not records:
        # The report is not written in this case, so the message itself says which rows went and why.
        rows_by_reason: dict[str, list[int]] = defaultdict(list)
        for d in report["dropped"]:
            rows_by_reason[reason_kind(d["reason"])].append(d[label])
        detail = "; ".join(f"{reason}: {_rows_text(label, numbers)}" for reason, numbers in rows_by_reason.items())
        note = _system_prompt_note(report)
        raise DataError(
            f"{table.source}: no usable row — {len(table.rows)} read, all dropped "
            f"({', '.join(f'{k}: {v}' for k, v in reasons.items()) or 'no data rows'})"
            + (f". By reason — {detail}." if detail else ".") + (f" {note}" if note else "") + " Nothing was written."
        )
    return Prepared(records, report, table)


def split_by_question(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole questions (instruction + input), stratified by category, so none is in both splits.

    round(questions × eval_fraction) questions in all (halves up; at least one, never every question) are
    shared among the categories in proportion to their size, by largest remainder: each category gets its
    share rounded down or up, and the seed decides among equal remainders and which questions go.
    """
    if eval_fraction <= 0:
        return list(records), []
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[_dedupe_key(record["instruction"], record["input"])].append(record)
    by_category: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        by_category[members[0].get("category", "")].append(key)
    questions = len(groups)
    total = min(max(math.floor(questions * eval_fraction + 0.5), 1), questions - 1) if questions >= 2 else 0
    rng = random.Random(seed)
    categories = sorted(by_category)
    rng.shuffle(categories)  # the order among equal remainders, fixed by the seed
    # Integer arithmetic: category c's exact share is len(c) * total / questions.
    shares = {c: divmod(len(by_category[c]) * total, questions) for c in categories}
    counts = {c: whole for c, (whole, _) in shares.items()}
    leftover = total - sum(counts.values())
    for category in sorted(categories, key=lambda c: -shares[c][1])[:leftover]:  # stable: ties keep the seeded order
        counts[category] += 1
    eval_keys: set[str] = set()
    for category in sorted(by_category):
        keys = sorted(by_category[category])
        rng.shuffle(keys)
        eval_keys.update(keys[:counts[category]])
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
        if r["encoding"] == "cp949":
            rows.append(("file encoding", "cp949 (Korean Excel 'CSV (쉼표로 분리)'), read as Korean"))
        if r["history_not_used"]:
            rows.append(("rows whose history is not used", len(r["history_not_used"])))
        if r["system_prompt_tokens"] is not None:
            rows.append(("tokens of the system prompt + template", r["system_prompt_tokens"]))
        if _system_prompt_note(r):
            rows.append(("note", _system_prompt_note(r)))
        if r["token_lengths"]:
            rows += [(f"tokens per sample ({k})", v) for k, v in r["token_lengths"].items()]
        if r.get("categories"):
            rows += [(f"category: {k}", v) for k, v in r["categories"].items()]
        # object dtype: counts stay integers in the rendered table (a float column shows "650.0")
        return pd.DataFrame(rows, columns=["item", "value"], dtype=object).set_index("item")

    def issues(self):
        """Dropped and changed rows, and rows whose history is not used, with their row numbers and reasons."""
        import pandas as pd

        entries = [{**d, "action": "dropped", "detail": d["reason"]} for d in self.report["dropped"]]
        entries += [{**c, "action": "changed", "detail": c["change"]} for c in self.report["changed"]]
        entries += [{**h, "action": "history not used",
                     "detail": f"{h['turns']} earlier turn(s) in 'history' are not trained on; only instruction/input/output are"}
                    for h in self.report["history_not_used"]]
        frame = pd.DataFrame(entries)
        if frame.empty:
            return pd.DataFrame(columns=["action", "detail"])
        key = next(k for k in ("row", "line", "record") if k in frame.columns)
        return frame[[key, "action", "detail"]].sort_values(key, kind="stable").reset_index(drop=True)

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
    contents = {
        "ironman.json": alpaca,
        # LLaMA-Factory's registry entry for an Alpaca file (its `dataset_info.json` format).
        "dataset_info.json": {"ironman": {"file_name": "ironman.json", "formatting": "alpaca",
                                          "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                      "system": "system"}}},
        "train.jsonl": [chat(r) for r in train],
        "eval.jsonl": [chat(r) for r in held_out],
        "data_report.json": report,  # last: its presence means the folder is one complete, consistent set
    }
    files = {name: out / name for name in contents}
    out.mkdir(parents=True, exist_ok=True)
    # All files are written into a staging folder inside output_dir first, so a failed write (a full disk) leaves
    # the earlier set untouched; then they are moved in, data_report.json removed first and moved in last. Not
    # atomic_dir: it replaces the whole folder, and output_dir may hold other files (even the input sheet).
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out) as staging:
        for name, content in contents.items():
            write = atomic_write_jsonl if name.endswith(".jsonl") else atomic_write_json
            write(Path(staging) / name, content)
        files["data_report.json"].unlink(missing_ok=True)
        for name in contents:
            os.replace(Path(staging) / name, files[name])
    return PrepareResult(out, report, files)


def load_chat_records(path: str | Path, what: str) -> list[dict]:
    """Chat records written by `prepare` (or by hand: one {"messages": [...]} object per line)."""
    records = read_jsonl(path, what)
    for number, record in enumerate(records, start=1):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise DataError(f"{path}, record {number}: needs 'messages' ending with an assistant message")
    return records
