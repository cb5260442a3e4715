"""Tables for the console, the logs and the Markdown reports, from rows of already formatted cells."""

RULE = None  # a row that is a horizontal rule (text tables)


def text_table(header, rows, right=None):
    """A plain-text table. ``header`` and each row are lists of strings (a row may be shorter
    than the header, or ``RULE``); every column is as wide as its widest cell; columns listed in
    ``right`` (indices; default: all but the first) are right-aligned."""
    n = len(header)
    right = set(range(1, n)) if right is None else set(right)
    cells = [list(header)] + [list(r) + [""] * (n - len(r)) for r in rows if r is not RULE]
    widths = [max(len(str(row[k])) for row in cells) for k in range(n)]

    def line(row):
        parts = [str(c).rjust(w) if k in right else str(c).ljust(w) for k, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(parts).rstrip()

    width = len(line(header))
    out = [line(header), "-" * width]
    out += ["-" * width if r is RULE else line(list(r) + [""] * (n - len(r))) for r in rows]
    return "\n".join(out)


def markdown_table(header, rows, right=None):
    """A GitHub Markdown table; columns listed in ``right`` (indices) are right-aligned."""
    right = set(right or ())
    rule = ["---:" if k in right else "---" for k in range(len(header))]
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in [header, rule, *rows])
