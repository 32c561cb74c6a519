"""The tables of the example scripts: printed with rich, and returned as Markdown for ``examples/results/``."""

from rich.console import Console
from rich.table import Table


def show_table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    """Print ``rows`` (cells as strings, the first one a label) under the column names ``head`` as a rich table
    titled ``title``, and return the same table as Markdown lines (header, rule, one line per row)."""
    table = Table(title=title)
    for col in head:
        table.add_column(col, justify="left" if col == head[0] else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
