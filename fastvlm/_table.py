"""Plain-text and Markdown tables of strings (reports, benchmark summaries, the README's generated tables)."""
from __future__ import annotations


def text_table(rows):
    """Rows of strings as aligned columns under a rule; the last column is left free (it holds long reasons)."""
    n = len(rows[0]) - 1
    widths = [max(len(row[i]) for row in rows) for i in range(n)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:n], widths)) + "  " + row[n])
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * n + len(row[n])))
    return "\n".join(lines)


def markdown_table(head, rows, right=()):
    """A Markdown table: ``head`` and each row are sequences of cells (str() applied, '|' escaped); the columns whose
    indices are in ``right`` are right-aligned (numbers)."""
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"
    return "\n".join(["| " + " | ".join(map(cell, head)) + " |", rule]
                     + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])
