"""User text made safe for each place it is printed or written (its *sink*).

Any string that came from a user or from a file (an algorithm or model name, a path, a run id, a
reason stored in a record) is data, never markup or code. Each sink has one function here:

- :func:`console`: rich console markup (``[red]`` ...) escaped, terminal control codes shown as
  ``\\x1b`` instead of being sent to the terminal;
- :func:`plain`: control codes only (plain stdout/stderr lines, logs);
- :func:`markdown`: Markdown table cells and prose (HTML, code spans, emphasis, links, pipes);
- :func:`html`: HTML text and attribute values;
- :func:`csv_cell`: spreadsheet formula injection (``=HYPERLINK(...)``) neutralised;
- :func:`plot_label`: matplotlib text (mathtext ``$...$`` shown literally, control codes shown).

Nothing here imports the rest of bpfree.
"""

from __future__ import annotations

import html as _html
import re
from typing import Any

from rich.markup import escape as _rich_escape

# C0 and C1 control characters except newline and tab, and DEL: terminal escapes, carriage returns.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _show_control(match: re.Match[str]) -> str:
    return match.group(0).encode("unicode_escape").decode("ascii")


def plain(text: Any, one_line: bool = False) -> str:
    """Text with control characters shown as escapes (``\\x1b[31m`` prints as text, never as a colour)."""
    value = _CONTROL.sub(_show_control, str(text))
    return value.replace("\n", "\\n").replace("\t", " ") if one_line else value


def console(text: Any) -> str:
    """Text for rich's ``console.print`` with markup on: brackets shown as typed, control codes escaped."""
    return _rich_escape(plain(text))


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>])")


def markdown(text: Any) -> str:
    """Text for a Markdown table cell or sentence: shown literally, never interpreted.

    HTML is entity-escaped (a raw ``<script>`` or ``<img onerror>`` passes through Markdown to the
    page), Markdown punctuation is backslash-escaped, and line breaks become spaces (a newline
    would end a table row).
    """
    value = plain(text).replace("\r", " ").replace("\n", " ")
    value = _html.escape(value, quote=False)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", value)


def html(text: Any) -> str:
    """Text for HTML element content or a quoted attribute value."""
    return _html.escape(plain(text), quote=True)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def csv_cell(value: Any) -> Any:
    """A spreadsheet-safe cell: text that a spreadsheet would run as a formula gets a leading ``'``.

    Numbers and other non-text values are returned unchanged, so numeric columns stay numeric.
    """
    if not isinstance(value, str):
        return value
    value = plain(value)
    return "'" + value if value.startswith(_FORMULA_START) else value


def plot_label(text: Any) -> str:
    """Text for a matplotlib label, title or legend: ``$`` never starts mathtext, control codes shown."""
    return plain(text, one_line=True).replace("$", r"\$")


__all__ = ["console", "csv_cell", "html", "markdown", "plain", "plot_label"]
