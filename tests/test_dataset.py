"""The shipped data (data/ironman_ko.csv, .xlsx, eval_prompts.jsonl), loaded through notebook 01's code."""
from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import pytest
from conftest import ROOT

from ironman_nb.config import PrepareConfig
from ironman_nb.data import clean_table, read_sheet

CSV = ROOT / "data" / "ironman_ko.csv"
XLSX = ROOT / "data" / "ironman_ko.xlsx"
EVAL_PROMPTS = ROOT / "data" / "eval_prompts.jsonl"

CATEGORIES = {
    "identity", "ai_identity", "engineering", "everyday", "leadership",
    "people", "encouragement", "refusal", "style_transfer", "english_question",
}
HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\ud7b0-\ud7ff]")
LATIN = re.compile("[A-Za-z\u00c0-\u024f]")
HAN = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]")
MIN_HANGUL_SHARE = 0.9
MAX_EVAL_SIMILARITY = 0.5
MAX_TRAIN_SIMILARITY = 0.8


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def trigrams(text: str) -> frozenset[str]:
    text = normalise(text)
    return frozenset(text[i:i + 3] for i in range(len(text) - 2)) or frozenset([text])


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def hangul_letters(text: str) -> tuple[int, int]:
    return len(HANGUL.findall(text)), len(LATIN.findall(text))


@pytest.fixture(scope="module")
def table():
    return read_sheet(str(CSV))


@pytest.fixture(scope="module")
def records(table, tokenizer):
    prepared = clean_table(table, PrepareConfig(input_path=str(CSV)), tokenizer)
    assert prepared.report["rows_kept"] == prepared.report["rows_read"] == len(table.rows), prepared.report["dropped"]
    return prepared.records


@pytest.fixture(scope="module")
def eval_prompts():
    return [json.loads(line) for line in EVAL_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_nothing_dropped(table, records):
    assert len(records) == len(table.rows) >= 600


def test_category_filled_in_every_row(table):
    empty = [n for row, n in zip(table.rows, table.row_numbers) if not row.get("category", "").strip()]
    assert not empty, f"rows without a category: {empty}"
    unknown = {row["category"] for row in table.rows} - CATEGORIES
    assert not unknown, f"unknown categories: {unknown}"


def test_every_category_in_training_and_eval(records, eval_prompts):
    assert set(Counter(r["category"] for r in records)) == CATEGORIES
    assert set(Counter(p["category"] for p in eval_prompts)) == CATEGORIES


def test_outputs_non_empty(records):
    assert all(r["output"].strip() for r in records)


def test_outputs_are_korean(records):
    low = []
    total_hangul = total_latin = 0
    for r in records:
        hangul, latin = hangul_letters(r["output"])
        total_hangul, total_latin = total_hangul + hangul, total_latin + latin
        share = hangul / (hangul + latin) if hangul + latin else 0.0
        if share < MIN_HANGUL_SHARE:
            low.append((r["row"], round(share, 3)))
    assert not low, f"outputs under {MIN_HANGUL_SHARE:.0%} Hangul (row, share): {low}"
    assert total_hangul / (total_hangul + total_latin) >= MIN_HANGUL_SHARE


def test_no_han_characters(table, eval_prompts):
    found = [(n, column, value) for row, n in zip(table.rows, table.row_numbers)
             for column, value in row.items() if HAN.search(value)]
    found += [(f"eval prompt {i}", key, value) for i, prompt in enumerate(eval_prompts, start=1)
              for key, value in prompt.items() if HAN.search(str(value))]
    assert not found, f"Han characters in: {found}"


def test_enough_eval_prompts(eval_prompts):
    assert len(eval_prompts) >= 40
    assert all(p.get("prompt", "").strip() for p in eval_prompts)


def test_eval_prompts_do_not_overlap_training(records, eval_prompts):
    instructions = {normalise(r["instruction"]) for r in records}
    equal = [p["prompt"] for p in eval_prompts if normalise(p["prompt"]) in instructions]
    assert not equal, f"eval prompts that are training instructions: {equal}"
    grams = [(r["instruction"], trigrams(r["instruction"])) for r in records]
    score, prompt, instruction = max(
        (jaccard(trigrams(p["prompt"]), g), p["prompt"], text) for p in eval_prompts for text, g in grams
    )
    assert score <= MAX_EVAL_SIMILARITY, f"{prompt!r} is close to training instruction {instruction!r} ({score:.2f})"


def test_no_duplicate_instructions(records):
    counts = Counter(normalise(r["instruction"]) for r in records)
    duplicates = {text: n for text, n in counts.items() if n > 1}
    assert not duplicates, f"instructions used more than once: {duplicates}"
    grams = [(r["row"], trigrams(r["instruction"])) for r in records]
    score, a, b = max((jaccard(ga, gb), ra, rb) for (ra, ga), (rb, gb) in itertools.combinations(grams, 2))
    assert score <= MAX_TRAIN_SIMILARITY, f"rows {a} and {b} have near-duplicate instructions ({score:.2f})"


def test_xlsx_has_the_csv_rows(table):
    workbook = read_sheet(str(XLSX))
    assert workbook.sheet == "ironman"
    assert [c for c in workbook.columns if c] == [c for c in table.columns if c]
    assert workbook.rows == table.rows
