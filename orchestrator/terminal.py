"""The CLI's output console: tables keep every figure whole, at any width and in pipes.

Rich cuts a cell that does not fit its column to `3.2…`; a figure a speedrunner reads must never be cut. On a
terminal, cells that do not fit wrap inside their column instead (overflow "fold"); when stdout is a pipe or a
file (CI logs, `| tee`), there is no width to fit, so tables are laid out at their natural width.
"""
from __future__ import annotations

import json
import math
import sys

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

PIPE_WIDTH = 1000   # a pipe has no width: wide enough that no table of ours is ever squeezed


def whole(renderable):
    """The renderable with every table in it (nested in Groups and Panels too) set to wrap its cells, never cut
    them; a Panel is as wide as what it holds, not the console (a pipe's console is PIPE_WIDTH wide)."""
    if isinstance(renderable, Panel):
        renderable.expand = False
        whole(renderable.renderable)
    elif isinstance(renderable, Table):
        for column in renderable.columns:
            column.overflow, column.no_wrap = "fold", False
    elif isinstance(renderable, Group):
        for part in renderable.renderables:
            whole(part)
    return renderable


class OutputConsole(Console):
    """A rich Console whose tables never cut a figure; a pipe's output is not squeezed into 80 columns."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._fixed_width = "width" in kwargs

    def print(self, *objects, **kwargs) -> None:
        if not self._fixed_width:   # asked at each print: stdout may be swapped after import (tests, redirects)
            self._width = None if self.is_terminal else PIPE_WIDTH
        super().print(*(whole(o) for o in objects), **kwargs)


def _strict(x):
    """NaN and infinity (a diverged loss) become null: strict JSON, which every parser reads."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def print_json(obj) -> None:
    """`--json`: one JSON document on stdout, for scripts; the tables go to people."""
    sys.stdout.write(json.dumps(_strict(obj), indent=2) + "\n")
