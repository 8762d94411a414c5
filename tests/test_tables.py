import pandas as pd

from ironman_nb.tables import text_table


def test_a_table_shows_whole_cells_escaped_and_numbers_readably():
    advice = "The system prompt with the chat template alone takes 300 tokens: raise max_length or shorten system_prompt"
    frame = pd.DataFrame([("note", advice), ("answer", "<b>나는 아이언맨</b>\n둘째 줄"), ("global_step", 24.0),
                          ("learning_rate", 2e-08), ("eval_loss", 0.973595), ("missing", None), ("nan", float("nan"))],
                         columns=["item", "value"], dtype=object).set_index("item")
    html = text_table(frame).to_html()
    assert advice in html  # pandas' own HTML cuts cells at 50 characters
    assert "&lt;b&gt;나는 아이언맨&lt;/b&gt;" in html and "<b>" not in html
    assert "white-space: pre-wrap" in html
    cells = {row: text_table(frame).data.loc[row, "value"] for row in frame.index}
    assert cells["global_step"] == 24.0  # the data stays as it was; only its display changes
    for shown in (">24<", ">2e-08<", ">0.9736<", ">n/a<"):
        assert shown in html
