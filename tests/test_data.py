import csv
import json

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
    path = tmp_path / "cp949.csv"
    path.write_bytes("instruction,input,output\nhello,,world\n".encode() + "안녕,,토니\n".encode("cp949"))
    with pytest.raises(DataError, match=r"cp949.csv, line 3: .*not UTF-8"):
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
