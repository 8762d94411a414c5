import csv
import io
import json
import re
import zipfile

import pytest

from ironman_nb.config import DEFAULT_SYSTEM_PROMPT, PrepareConfig
from ironman_nb.data import (
    DataError,
    chat_messages,
    clean_table,
    prepare,
    read_sheet,
    sheets_export_url,
    split_by_question,
    tokenize_conversation,
)

HEADER = ["instruction", "input", "output"]


def write_csv(path, rows, header=HEADER, delimiter=",", encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def cfg_for(tmp_path, input_path, **kw):
    return PrepareConfig(input_path=str(input_path), output_dir=str(tmp_path / "out"), **kw)


def good_rows(n=10):
    return [[f"질문 {i}: 슈트 몇 벌이야?", "", f"답 {i}: 많지. 세는 건 자비스 일이야."] for i in range(n)]


def test_prepare_writes_every_file(tmp_path, tokenizer):
    path = write_csv(tmp_path / "sheet.csv", good_rows(10))
    result = prepare(cfg_for(tmp_path, path, eval_fraction=0.2), tokenizer)
    out = tmp_path / "out"
    alpaca = json.loads((out / "ironman.json").read_text(encoding="utf-8"))
    assert len(alpaca) == 10 and set(alpaca[0]) == {"instruction", "input", "output", "system"}
    assert alpaca[0]["system"] == DEFAULT_SYSTEM_PROMPT
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["ironman"]["file_name"] == "ironman.json"
    assert info["ironman"]["columns"]["prompt"] == "instruction"
    train = [json.loads(l) for l in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    held = [json.loads(l) for l in (out / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(train) + len(held) == 10 and len(held) == 2
    assert [m["role"] for m in train[0]["messages"]] == ["system", "user", "assistant"]
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    assert report["rows_read"] == 10 and report["rows_kept"] == 10 and report["dropped"] == []
    assert result.summary().loc["train rows", "value"] == 8


def test_split_keeps_each_question_on_one_side():
    records = [{"instruction": f"q{i % 5}", "input": "", "output": f"a{i}", "category": "c", "row": i} for i in range(20)]
    train, held = split_by_question(records, 0.4, seed=1)
    assert {r["instruction"] for r in train}.isdisjoint({r["instruction"] for r in held})
    assert len({r["instruction"] for r in held}) == 2
    assert split_by_question(records, 0.4, seed=1) == (train, held)


def test_split_is_stratified_by_category():
    records = [{"instruction": f"{c}{i}", "input": "", "output": "x", "category": c, "row": i}
               for c in ("a", "b", "c") for i in range(10)]
    _, held = split_by_question(records, 0.2, seed=0)
    assert sorted(r["category"] for r in held) == ["a", "a", "b", "b", "c", "c"]


def test_bad_rows_are_dropped_and_reported_with_row_numbers(tmp_path, tokenizer):
    rows = good_rows(3) + [
        ["", "", ""],                                   # row 5: blank
        ["", "", "답만 있어"],                            # row 6: missing instruction
        ["질문만 있어", "", "   "],                        # row 7: missing output
        good_rows(1)[0],                                # row 8: duplicate of row 2
        ["  질문 0: 슈트 몇 벌이야?  ", "", "답 0:  많지. 세는 건 자비스 일이야.\n"],  # row 9: whitespace-only duplicate
        ["=SUM(A1:A3)", "", "  수식처럼 보여도 글자야\n둘째 줄  "],   # row 10: kept, trimmed, newline kept
    ]
    path = write_csv(tmp_path / "sheet.csv", rows)
    result = prepare(cfg_for(tmp_path, path, eval_fraction=0.0), tokenizer)
    reasons = {d["row"]: d["reason"] for d in result.report["dropped"]}
    assert reasons == {5: "blank", 6: "missing instruction", 7: "missing output",
                       8: "duplicate of row 2", 9: "duplicate of row 2"}
    assert result.report["rows_kept"] == 4
    kept = json.loads((tmp_path / "out" / "ironman.json").read_text(encoding="utf-8"))
    formula = [r for r in kept if r["instruction"].startswith("=")][0]
    assert formula["output"] == "수식처럼 보여도 글자야\n둘째 줄"
    assert {c["row"] for c in result.report["changed"]} == {10}
    issues = result.issues()
    assert list(issues["row"]) == [5, 6, 7, 8, 9, 10]


def test_bom_and_semicolon_delimiter_are_read(tmp_path):
    path = write_csv(tmp_path / "excel.csv", good_rows(2), delimiter=";", encoding="utf-8-sig")
    table = read_sheet(str(path))
    assert table.delimiter == ";"
    assert table.columns[:3] == HEADER
    assert table.rows[0]["instruction"] == "질문 0: 슈트 몇 벌이야?"


def test_non_utf8_bytes_name_the_line(tmp_path):
    # UTF-8 Korean and then cp949 Korean (a line pasted from another file): neither encoding reads it all.
    path = tmp_path / "mixed.csv"
    path.write_bytes("instruction,input,output\n안녕,,토니\n".encode() + "안녕,,토니\n".encode("cp949"))
    with pytest.raises(DataError, match=r"mixed.csv, line 3: .*not UTF-8"):
        read_sheet(str(path))


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"question,answer\nq,a\n", r"missing column\(s\) 'instruction', 'output'.*Expected columns"),
    (b"instruction,inputs,outptu\nq,,a\n", r"missing column\(s\) 'output'.*'outptu' → 'output'"),
])
def test_unusable_files_get_one_clear_message(tmp_path, content, message):
    path = tmp_path / "sheet.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_sheet(str(path))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_sheet(str(tmp_path / "nope.csv"))
    other = tmp_path / "sheet.ods"
    other.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_sheet(str(other))


def test_every_row_filtered_stops_and_writes_nothing(tmp_path, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("earlier good output\n")
    path = write_csv(tmp_path / "sheet.csv", [["", "", ""], ["q", "", ""]])
    with pytest.raises(DataError, match=r"no usable row — 2 read, all dropped \(blank: 1, missing output: 1\)"):
        prepare(cfg_for(tmp_path, path), tokenizer)
    assert (out / "train.jsonl").read_text() == "earlier good output\n"
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]


def test_xlsx_picks_the_sheet_with_the_header_and_keeps_formulas_as_text(tmp_path):
    import openpyxl

    workbook = openpyxl.Workbook()
    notes = workbook.active
    notes.title = "notes"
    notes.append(["this sheet is a cover page"])
    data = workbook.create_sheet("data")
    data.append(["Instruction", "Input", "Output", "category"])
    data.append(["수식 테스트", None, "=1+1", "identity"])
    data.append([42, None, 3.0, "identity"])
    path = tmp_path / "sheet.xlsx"
    workbook.save(path)
    table = read_sheet(str(path))
    assert table.sheet == "data"
    assert table.rows[0]["output"] == "=1+1"
    assert table.rows[1] == {"instruction": "42", "input": "", "output": "3", "category": "identity"}
    assert table.row_numbers == [2, 3]
    with pytest.raises(DataError, match=r"no sheet named 'Sheet9'; sheets: \['notes', 'data'\]"):
        read_sheet(str(path), sheet="Sheet9")
    with pytest.raises(DataError, match="missing column"):
        read_sheet(str(path), sheet="notes")


def test_xlsx_header_below_empty_rows_is_found_and_rows_keep_their_numbers(tmp_path):
    import openpyxl

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append([])
    sheet.append([None, "  "])
    sheet.append(["instruction", "input", "output"])
    sheet.append(["누구야?", None, "토니 스타크."])
    path = tmp_path / "sheet.xlsx"
    workbook.save(path)
    table = read_sheet(str(path))
    assert table.rows == [{"instruction": "누구야?", "input": "", "output": "토니 스타크."}]
    assert table.row_numbers == [4]  # as Excel numbers it, for the report's row references


def test_json_and_jsonl(tmp_path):
    records = [{"instruction": "q1", "input": "", "output": "a1"}, {"instruction": "q2", "output": "a2", "system": "s"}]
    (tmp_path / "a.json").write_text(json.dumps(records), encoding="utf-8")
    assert [r["instruction"] for r in read_sheet(str(tmp_path / "a.json")).rows] == ["q1", "q2"]
    lines = json.dumps(records[0]) + "\n" + '{"instruction": "q2", "output": \n'
    (tmp_path / "b.jsonl").write_text(lines, encoding="utf-8")
    with pytest.raises(DataError, match=r"b.jsonl, line 2: not valid JSON"):
        read_sheet(str(tmp_path / "b.jsonl"))


def test_google_sheets_links_become_csv_exports():
    url = "https://docs.google.com/spreadsheets/d/1CdZAw-RsjrANNML4JQZS02pJ3kBDa0QtrEgeDKS7VLg/edit?usp=sharing#gid=77"
    assert sheets_export_url(url) == (
        "https://docs.google.com/spreadsheets/d/1CdZAw-RsjrANNML4JQZS02pJ3kBDa0QtrEgeDKS7VLg/export?format=csv&gid=77"
    )
    assert sheets_export_url("data/ironman_ko.csv") is None


@pytest.mark.parametrize("policy", ["drop", "truncate", "stop"])
def test_over_length_policy(tmp_path, tokenizer, policy):
    long_answer = "아주 긴 대답이야. " * 60
    rows = good_rows(2) + [["긴 질문", "", long_answer]]
    path = write_csv(tmp_path / "sheet.csv", rows)
    cfg = cfg_for(tmp_path, path, max_length=320, over_length=policy, eval_fraction=0.0)
    if policy == "stop":
        with pytest.raises(DataError, match=r"sheet.csv, row 4: \d+ tokens after the chat template, over max_length=320"):
            prepare(cfg, tokenizer)
        return
    result = prepare(cfg, tokenizer)
    if policy == "drop":
        assert result.report["rows_kept"] == 2
        assert result.report["dropped"][0]["row"] == 4
        assert "over the length limit" in result.report["dropped"][0]["reason"]
    else:
        assert result.report["rows_kept"] == 3
        assert any("truncated" in c["change"] for c in result.report["changed"] if c["row"] == 4)
        assert result.report["token_lengths"]["max"] <= 320
        kept = json.loads((tmp_path / "out" / "ironman.json").read_text(encoding="utf-8"))
        assert long_answer.startswith(kept[-1]["output"]) and len(kept[-1]["output"]) < len(long_answer)


def test_labels_cover_the_answer_and_its_end_of_turn_only(tokenizer):
    messages = chat_messages({"instruction": "안녕?", "input": "", "output": "그래, 반가워."}, DEFAULT_SYSTEM_PROMPT)
    encoded = tokenize_conversation(tokenizer, messages)
    learned = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100]
    assert tokenizer.decode(learned) == "그래, 반가워.<|im_end|>\n"
    assert encoded["labels"][: len(encoded["labels"]) - len(learned)] == [-100] * (len(encoded["labels"]) - len(learned))
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(encoded["input_ids"]) == full


def test_input_column_is_appended_to_the_user_turn():
    messages = chat_messages({"instruction": "토니처럼 바꿔줘", "input": "회의는 3시입니다.", "output": "3시야."}, "sys")
    assert messages[1]["content"] == "토니처럼 바꿔줘\n\n회의는 3시입니다."
    assert chat_messages({"instruction": "q", "input": "", "output": "a", "system": "own"}, "sys")[0]["content"] == "own"


def test_clean_table_respects_row_labels_for_jsonl(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text('{"instruction": "q", "output": "a"}\n\n{"instruction": "q", "output": "a"}\n')
    prepared = clean_table(read_sheet(str(tmp_path / "a.jsonl")), PrepareConfig(input_path="x"), tokenizer)
    assert prepared.report["dropped"] == [{"line": 3, "reason": "duplicate of line 1"}]


# ---------------------------------------------------------------- split size

def questions_in(records):
    return {r["instruction"] for r in records}


@pytest.mark.parametrize("categories, per_category, fraction, expected", [
    (20, 4, 0.1, 8),     # per-category rounding held out 1 question here
    (20, 4, 0.2, 16),    # and 20 here
    (10, 5, 0.15, 8),    # 7.5 rounds up
    (100, 1, 0.2, 20),   # single-question categories
    (1, 2, 0.01, 1),     # at least one question is held out
    (1, 2, 0.9, 1),      # and at least one stays for training
    (1, 1, 0.5, 0),      # a single question cannot be split
])
def test_split_holds_out_the_requested_share_of_questions(categories, per_category, fraction, expected):
    records = [{"instruction": f"c{c}-q{i}", "input": "", "output": "a", "category": f"c{c}", "row": i}
               for c in range(categories) for i in range(per_category)]
    train, held = split_by_question(records, fraction, seed=3)
    assert len(questions_in(held)) == expected
    assert questions_in(train).isdisjoint(questions_in(held)) and len(train) + len(held) == len(records)
    # stratified: each category holds out its proportional share rounded down or up
    share = expected * per_category / len(records)
    for c in range(categories):
        assert int(share) <= sum(r["category"] == f"c{c}" for r in held) <= int(share) + 1
    assert split_by_question(records, fraction, seed=3) == (train, held)


def test_split_shares_the_remainder_among_categories_by_seed():
    records = [{"instruction": f"{c}{i}", "input": "", "output": "x", "category": c, "row": i}
               for c in "abcdefghij" for i in range(4)]
    held_categories = {tuple(sorted({r["category"] for r in split_by_question(records, 0.1, seed)[1]})) for seed in range(6)}
    assert all(len(c) == 4 for c in held_categories)  # 4 of the 40 questions, from 4 different categories
    assert len(held_categories) > 1  # which categories, the seed decides


# ---------------------------------------------------------------- Google Sheets links

SHEET_ID = "1CdZAw-RsjrANNML4JQZS02pJ3kBDa0QtrEgeDKS7VLg"


@pytest.mark.parametrize("link, export", [
    (f"https://docs.google.com/spreadsheets/u/0/d/{SHEET_ID}/edit#gid=5",
     f"https://docs.google.com/spreadsheets/d/{SHEET_ID}/export?format=csv&gid=5"),
    (f"http://docs.google.com/spreadsheets/d/{SHEET_ID}/edit",
     f"https://docs.google.com/spreadsheets/d/{SHEET_ID}/export?format=csv"),
    (f"docs.google.com/spreadsheets/d/{SHEET_ID}/edit?gid=3",
     f"https://docs.google.com/spreadsheets/d/{SHEET_ID}/export?format=csv&gid=3"),
    ("https://docs.google.com/spreadsheets/d/e/2PACX-1vQ_pub-Id/pub?gid=0&single=true&output=csv",
     "https://docs.google.com/spreadsheets/d/e/2PACX-1vQ_pub-Id/pub?output=csv&gid=0&single=true"),
    ("https://docs.google.com/spreadsheets/d/e/2PACX-1vQ_pub-Id/pubhtml",
     "https://docs.google.com/spreadsheets/d/e/2PACX-1vQ_pub-Id/pub?output=csv"),
])
def test_every_google_sheets_link_form_is_read(link, export):
    assert sheets_export_url(link) == export


class FakeResponse(io.BytesIO):
    def __init__(self, body, content_type):
        super().__init__(body)
        self.headers = {"Content-Type": content_type}


def serve(monkeypatch, body, content_type):
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        return FakeResponse(body, content_type)

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    return requested


def test_a_shared_sheet_is_downloaded_as_csv(monkeypatch):
    requested = serve(monkeypatch, "instruction,output\n질문,답\n".encode(), "text/csv; charset=utf-8")
    table = read_sheet(f"docs.google.com/spreadsheets/d/{SHEET_ID}/edit#gid=9")
    assert requested == [f"https://docs.google.com/spreadsheets/d/{SHEET_ID}/export?format=csv&gid=9"]
    assert table.rows == [{"instruction": "질문", "output": "답"}]


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_a_sheet_that_is_not_shared_says_to_share_it(monkeypatch, content_type):
    serve(monkeypatch, b"\n<!DOCTYPE html><html><title>Sign in</title>instruction,output</html>", content_type)
    with pytest.raises(DataError, match=r"not shared.*'Anyone with the link' \(Viewer\)"):
        read_sheet(f"https://docs.google.com/spreadsheets/d/{SHEET_ID}/edit")


@pytest.mark.parametrize("link", ["https://example.com/sheet.csv", "https://drive.google.com/file/d/abc/view",
                                  "docs.google.com/document/d/abc/edit"])
def test_other_links_say_to_download_the_file(monkeypatch, link):
    serve(monkeypatch, b"", "text/html")
    with pytest.raises(DataError, match="not a Google Sheets link this tool can read.*give its path"):
        read_sheet(link)


def test_a_link_taken_for_a_path_says_to_add_the_scheme(tmp_path):
    resolved = tmp_path / f"docs.google.com/spreadsheets/d/{SHEET_ID}/edit"  # what the runner makes of a bare link
    with pytest.raises(DataError, match="file not found.*a Google Sheets link must start with https://"):
        read_sheet(str(resolved))


# ---------------------------------------------------------------- CSV parsing

@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_quoted_header_with_semicolons_or_tabs_is_read(tmp_path, delimiter):
    path = tmp_path / "quoted.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter, quoting=csv.QUOTE_ALL)
        writer.writerows([["instruction", "input", "output"], ["질문, 쉼표", "", "답; 세미콜론"]])
    table = read_sheet(str(path))
    assert table.delimiter == delimiter
    assert table.rows == [{"instruction": "질문, 쉼표", "input": "", "output": "답; 세미콜론"}]


@pytest.mark.parametrize("body, where", [
    ('q1,"answer that never closes\nq2,a2\nq3,a3\n', r"row 2 \(line 2, read up to line 4\)"),
    ('q1,a1\nq2,"never closes\n' + "q,a\n" * 40_000, r"row 3 \(line 3, read up to line \d{5}\)"),  # csv's field limit
    ('q1,a1\n"quoted" then text,a2\n', r"row 3 \(line 3"),
])
def test_a_broken_quote_stops_with_its_row(tmp_path, body, where):
    path = tmp_path / "quotes.csv"
    path.write_text("instruction,output\n" + body, encoding="utf-8")
    with pytest.raises(DataError, match=rf"quotes.csv, {where}.*not valid CSV.*never closed"):
        read_sheet(str(path))


@pytest.mark.parametrize("header, message", [
    ("instruction,output,output", r"two columns mean 'output': column 2 \(B, 'output'\) and column 3 \(C, 'output'\)"),
    ("Output,instruction,output", r"two columns mean 'output': column 1 \(A, 'Output'\) and column 3 \(C, 'output'\)"),
])
def test_duplicate_columns_are_refused(tmp_path, header, message):
    path = tmp_path / "sheet.csv"
    path.write_text(header + "\n질문,답,다른 답\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_sheet(str(path))


def test_duplicate_columns_in_a_workbook_are_refused_not_skipped(tmp_path):
    import openpyxl

    workbook = openpyxl.Workbook()
    workbook.active.title = "data"
    workbook.active.append(["instruction", "output", "OUTPUT "])
    workbook.active.append(["질문", "답", "다른 답"])
    path = tmp_path / "sheet.xlsx"
    workbook.save(path)
    with pytest.raises(DataError, match=r"\[sheet 'data'\]: two columns mean 'output'"):
        read_sheet(str(path))


def test_a_truncated_utf16_file_names_the_line(tmp_path):
    path = tmp_path / "utf16.csv"
    path.write_bytes("instruction,output\nq,a\n".encode("utf-16")[:-1])
    with pytest.raises(DataError, match=r"utf16.csv, line 2: the UTF-16 text is cut off"):
        read_sheet(str(path))


def test_a_korean_excel_csv_in_cp949_is_read_and_reported(tmp_path, tokenizer):
    path = tmp_path / "excel.csv"
    path.write_bytes("instruction,input,output\r\n슈트 몇 벌이야?,,많지. 세는 건 자비스 일이야.\r\n".encode("cp949"))
    result = prepare(cfg_for(tmp_path, path, eval_fraction=0.0), tokenizer)
    assert result.report["encoding"] == "cp949"
    assert json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))["encoding"] == "cp949"
    kept = json.loads((tmp_path / "out" / "ironman.json").read_text(encoding="utf-8"))
    assert kept[0]["instruction"] == "슈트 몇 벌이야?"
    assert "cp949" in result.summary().loc["file encoding", "value"]


def test_bytes_without_hangul_are_not_guessed_as_cp949(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("instruction,output\n¿Qué?,sí\n".encode("latin-1"))  # decodes as cp949, but to no Hangul
    with pytest.raises(DataError, match=r"latin1.csv, line 2: byte 0xbf is not UTF-8"):
        read_sheet(str(path))


# ---------------------------------------------------------------- XLSX

def test_xlsx_array_and_data_table_formulas_stay_text(tmp_path):
    import openpyxl
    from openpyxl.worksheet.formula import ArrayFormula, DataTableFormula

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["instruction", "output"])
    sheet["A2"], sheet["B2"] = "배열 수식", ArrayFormula("B2", "=SUM(A1:A2)")
    sheet["A3"], sheet["B3"] = "데이터 표", DataTableFormula("B3", dt2D=True, r1="A1", r2="A2")
    path = tmp_path / "formulas.xlsx"
    workbook.save(path)
    assert [r["output"] for r in read_sheet(str(path)).rows] == ["=SUM(A1:A2)", "=TABLE(A1,A2)"]


def test_xlsx_with_a_stale_dimension_keeps_every_row(tmp_path):
    import openpyxl

    workbook = openpyxl.Workbook()
    workbook.active.append(["instruction", "output"])
    for i in range(10):
        workbook.active.append([f"질문 {i}", f"답 {i}"])
    good = tmp_path / "good.xlsx"
    workbook.save(good)
    # Some writers store a <dimension> smaller than the data; read-only openpyxl trusts it.
    stale = tmp_path / "stale.xlsx"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(stale, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = re.sub(rb'<dimension ref="[^"]*"', b'<dimension ref="A1:B4"', data)
            target.writestr(item, data)
    table = read_sheet(str(stale))
    assert len(table.rows) == 10 and table.row_numbers[-1] == 11 and table.rows[-1]["output"] == "답 9"


# ---------------------------------------------------------------- JSON

def test_json_keys_are_matched_per_record_and_null_or_nan_is_empty(tmp_path):
    path = tmp_path / "merged.json"
    path.write_text('[{"instruction": "q1", "input": NaN, "output": "a1"},'
                    ' {"Instruction": "q2", "Input": null, "OUTPUT": "a2", "Category": "c"}]', encoding="utf-8")
    table = read_sheet(str(path))
    assert table.columns == ["instruction", "input", "output", "category"]
    assert table.rows == [{"instruction": "q1", "input": "", "output": "a1"},
                          {"instruction": "q2", "input": "", "output": "a2", "category": "c"}]


@pytest.mark.parametrize("records, message", [
    ([{"instruction": "q", "input": {"도시": "서울"}, "output": "a"}], r"record 1: 'input' holds an object, not text"),
    ([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ["a", "b"]}], r"record 2: 'output' holds a list"),
    ([{"instruction": "q", "output": "a", "Output": "b"}], r"record 1: keys 'output' and 'Output' both mean 'output'"),
])
def test_json_values_that_are_not_text_are_refused(tmp_path, records, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_sheet(str(path))


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"instruction": "q1", "output": "첫 줄\u2028둘째 줄\u2029셋째\x85끝"}, ensure_ascii=False),
             json.dumps({"instruction": "q2", "output": "a2"}), '{"instruction": "q3", "output": ']
    path.write_bytes("\r\n".join(lines).encode())
    with pytest.raises(DataError, match=r"data.jsonl, line 3: not valid JSON"):
        read_sheet(str(path))
    path.write_bytes("\r\n".join(lines[:2]).encode())
    table = read_sheet(str(path))
    assert table.row_numbers == [1, 2] and table.rows[0]["output"] == "첫 줄\u2028둘째 줄\u2029셋째\x85끝"


def test_unused_alpaca_history_is_reported(tmp_path, tokenizer):
    records = [{"instruction": "자기소개 해줘", "input": "", "output": "나는 아이언맨이다.",
                "history": [["안녕", "안녕, 난 토니야."], ["뭐해?", "슈트 만드는 중."]]},
               {"instruction": "q2", "output": "a2", "history": []}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    result = prepare(cfg_for(tmp_path, path, eval_fraction=0.0), tokenizer)
    assert result.report["history_not_used"] == [{"record": 1, "turns": 2}]
    assert result.summary().loc["rows whose history is not used", "value"] == 1
    issues = result.issues()
    assert list(issues["record"]) == [1] and issues["action"][0] == "history not used"


# ---------------------------------------------------------------- messages and writing

def test_every_row_dropped_names_the_rows_and_a_system_prompt_that_leaves_no_room(tmp_path, tokenizer):
    path = write_csv(tmp_path / "sheet.csv", good_rows(3) + [["", "", ""]])
    with pytest.raises(DataError) as caught:
        prepare(cfg_for(tmp_path, path, max_length=200), tokenizer)
    message = str(caught.value)
    assert "over the length limit: rows 2, 3, 4; blank: row 5" in message
    assert re.search(r"system prompt with the chat template alone is \d+ tokens of max_length=200", message)
    assert "See the reasons above" not in message and not (tmp_path / "out").exists()


def test_the_summary_names_a_system_prompt_that_crowds_out_rows(tmp_path, tokenizer):
    path = write_csv(tmp_path / "sheet.csv", good_rows(2) + [["긴 질문", "", "아주 긴 대답이야. " * 60]])
    result = prepare(cfg_for(tmp_path, path, max_length=320, eval_fraction=0.0), tokenizer)
    system_tokens = result.report["system_prompt_tokens"]
    assert 160 <= system_tokens < 320
    assert result.summary().loc["note", "value"].startswith(
        f"The system prompt with the chat template alone is {system_tokens} tokens of max_length=320")
    result = prepare(cfg_for(tmp_path, path, max_length=1024, eval_fraction=0.0), tokenizer)
    assert "note" not in result.summary().index


def test_over_length_stop_says_which_part_is_long(tmp_path, tokenizer):
    path = write_csv(tmp_path / "sheet.csv", [["긴 질문 " * 80, "", "짧은 답"]])
    with pytest.raises(DataError, match=r"row 2: \d+ tokens .*\(system prompt \d+, question \d+, answer \d+\)\. "
                                        r"Shorten the instruction/input"):
        prepare(cfg_for(tmp_path, path, max_length=400, over_length="stop"), tokenizer)


def earlier_run(tmp_path, tokenizer):
    out = tmp_path / "out"
    prepare(cfg_for(tmp_path, write_csv(tmp_path / "old.csv", good_rows(10)), eval_fraction=0.2), tokenizer)
    (out / "notes.txt").write_text("the user's own file")
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_failed_write_leaves_the_earlier_files_whole(tmp_path, tokenizer, monkeypatch):
    out, before = earlier_run(tmp_path, tokenizer)
    import ironman_nb.data as data

    real = data.atomic_write_jsonl

    def disk_full_at_eval(path, records):
        if path.name == "eval.jsonl":
            raise OSError(28, "No space left on device")
        return real(path, records)

    monkeypatch.setattr(data, "atomic_write_jsonl", disk_full_at_eval)
    new_sheet = write_csv(tmp_path / "new.csv", good_rows(4))
    with pytest.raises(OSError, match="No space left"):
        prepare(cfg_for(tmp_path, new_sheet), tokenizer)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_interrupted_swap_leaves_no_report(tmp_path, tokenizer):
    out, _ = earlier_run(tmp_path, tokenizer)
    (out / "eval.jsonl").unlink()
    (out / "eval.jsonl").mkdir()  # the new eval.jsonl cannot be moved in
    with pytest.raises(OSError):
        prepare(cfg_for(tmp_path, write_csv(tmp_path / "new.csv", good_rows(4))), tokenizer)
    assert not (out / "data_report.json").exists()  # the folder does not claim to be complete
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_new_run_replaces_the_outputs_and_keeps_other_files(tmp_path, tokenizer):
    out, _ = earlier_run(tmp_path, tokenizer)
    result = prepare(cfg_for(tmp_path, write_csv(tmp_path / "new.csv", good_rows(4))), tokenizer)
    assert sorted(p.name for p in out.iterdir()) == sorted([*result.files, "notes.txt"])
    assert json.loads((out / "data_report.json").read_text(encoding="utf-8"))["rows_read"] == 4
