"""How the notebooks show a table: each cell's whole text (pandas cuts it at 50 characters by default, which hid
the advice in notebook 01's warnings), line breaks kept, text escaped (model output and file names are not HTML),
numbers to four significant digits and whole numbers without decimals."""
from __future__ import annotations

import math


def cell_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def text_table(frame):
    """A pandas Styler of `frame` for display in a notebook (`frame` itself stays the data)."""
    return frame.style.format(formatter=cell_text, escape="html").set_properties(
        **{"white-space": "pre-wrap", "text-align": "left"})
