"""Results tables as a reader wants them: short column names, accuracies in percent,
no all-empty columns, and narrow enough to fit a notebook without scrolling sideways.

Every ``*_table`` function returns a :class:`pandas.DataFrame` of strings (and counts);
:func:`html` wraps one for ``IPython.display.display``. Used by
``analysis/critical_step.ipynb``; the numbers are those of the library's tables.
"""

from __future__ import annotations

import html as _html
import math

import pandas as pd

__all__ = [
    "percent",
    "steps_list",
    "drop_empty",
    "overview_table",
    "settings_table",
    "critical_table",
    "crossing_summary",
    "transpose",
    "HtmlTable",
    "html",
]

_METHOD_NAMES = {"euler": "Euler", "midpoint": "Midpoint", "rk4": "RK4", "fehlberg2": "Fehlberg21", "dopri5": "Dopri54"}
EMPTY = "-"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def percent(mean, std=None, digits: int = 1) -> str:
    """``0.823`` as ``"82.3 %"``, with ``std`` ``"82.3 ± 1.2 %"``; ``"-"`` for a missing mean."""
    if _missing(mean):
        return EMPTY
    text = f"{100 * float(mean):.{digits}f}"
    return f"{text} ± {100 * float(std):.{digits}f} %" if not _missing(std) else f"{text} %"


def _method(name) -> str:
    return _METHOD_NAMES.get(name, str(name))


def steps_list(values, adaptive: bool = False) -> str:
    """Training settings in a short list, coarse to fine: ``"1, 2, 4 steps"``, ``"tol 0.01, 0.001"``;
    more than six are shortened to the first three, an ellipsis and the last two."""
    values = sorted({float(v) for v in values if not _missing(v)}, reverse=adaptive)
    texts = [f"{v:g}" for v in values]
    if len(texts) > 6:
        texts = texts[:3] + ["…"] + texts[-2:]
    if not texts:
        return EMPTY
    return f"tol {', '.join(texts)}" if adaptive else f"{', '.join(texts)} step{'s' if values != [1.0] else ''}"


def drop_empty(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without the columns that hold nothing (all missing, or all ``"-"``)."""
    keep = [c for c in df.columns if not df[c].map(lambda v: _missing(v) or v == EMPTY or v == "–").all()]
    return df[keep]


def overview_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset, train method and gradient of a grid's results: the training settings,
    trials and seeds, and train and test accuracy (mean ± std over trials, under the train solver)."""
    trials = results.drop_duplicates("trial_id")
    rows = []
    for (dataset, method, gradient), group in trials.groupby(["dataset", "train_method", "gradient"], dropna=False, sort=True):
        fixed = group[group.train_steps.notna()]
        settings = [steps_list(fixed.train_steps)] if len(fixed) else []
        if group.train_tol.notna().any():
            settings.append(steps_list(group.train_tol, adaptive=True))
        rows.append({
            "dataset": dataset,
            "train method": _method(method),
            "gradient": gradient,
            "trained with": "; ".join(settings),
            "trials": len(group),
            "seeds": group.seed.nunique(),
            "train accuracy": percent(group.train_accuracy.mean(), group.train_accuracy.std() if len(group) > 1 else None),
            "test accuracy": percent(group.test_accuracy.mean(), group.test_accuracy.std() if len(group) > 1 else None),
        })
    return drop_empty(pd.DataFrame(rows))


def _setting(row) -> str:
    if not _missing(row.get("train_tol")):
        return f"tol {row['train_tol']:g}"
    steps = int(row["train_steps"])
    return f"{steps} step{'s' if steps != 1 else ''}"


def _test_name(text) -> str:
    """``"rk4(steps=2)"`` as ``"RK4, 2 steps"`` (``solver_independence``'s worst test)."""
    if _missing(text):
        return EMPTY
    method, _, rest = str(text).partition("(")
    key, _, value = rest.rstrip(")").partition("=")
    if key == "steps":
        return f"{_method(method)}, {value} step{'s' if value != '1' else ''}"
    return f"{_method(method)}, tol {value}" if key == "tol" else _method(method)


def settings_table(independence: pd.DataFrame) -> pd.DataFrame:
    """The per-setting table of the critical-step rule (``analysis.critical_step.solver_independence``)
    for reading: train setting, seeds used and excluded, accuracy under the train solver, the worst
    test solver of smaller error, its accuracy difference and the verdict."""
    rows = []
    for r in independence.to_dict("records"):
        used = int(r["seeds"])
        if used == 0:
            verdict = "no trained seed"
        else:
            verdict = "independent" if r["independent"] else "dependent"
        rows.append({
            "dataset": r["dataset"],
            "train method": _method(r["train_method"]),
            "gradient": r["gradient"],
            "setting": _setting(r),
            "seeds used": f"{used} of {used + int(r['excluded_seeds'])}",
            "accuracy": percent(r["accuracy_mean"], r["accuracy_std"] if used > 1 else None),  # no spread of one seed
            "worst test": _test_name(r["worst_test"]),
            "difference": EMPTY if _missing(r["max_difference"]) else f"{100 * r['max_difference']:.1f} pp",
            "verdict": verdict,
        })
    return drop_empty(pd.DataFrame(rows))


def critical_table(display_rows: list[dict]) -> pd.DataFrame:
    """The critical-step summary as the CLI prints it (``analysis.critical_step.display_rows``),
    method names spelled out and empty columns left out."""
    table = pd.DataFrame(display_rows)
    if "train method" in table:
        table["train method"] = table["train method"].map(_method)
    return drop_empty(table)


def crossing_summary(crossing: pd.DataFrame) -> pd.DataFrame:
    """Per train method and step count, the crossing fraction (mean ± std over trials, in percent)
    of :func:`analysis.trajectories.crossing_table`."""
    rows = []
    for (method, steps), group in crossing.groupby(["train_method", "train_steps"], sort=True):
        std = group.crossing.std() if len(group) > 1 else None
        rows.append({"train method": _method(method), "train steps": int(steps), "trials": len(group),
                     "crossing pairs": percent(group.crossing.mean(), std)})
    return pd.DataFrame(rows)


def transpose(table: pd.DataFrame, key_columns: int = 1, label: str = "") -> pd.DataFrame:
    """A wide table of a few rows turned on its side: one row per column of ``table``, one column per
    row, named by its first ``key_columns`` values joined with ", " (the rows of Table 1, say)."""
    if table.empty:
        return table
    keys = list(table.columns[:key_columns])
    names = [", ".join(str(v) for v in row) for row in table[keys].itertuples(index=False, name=None)]
    if len(set(names)) < len(names):  # keep the new column names apart
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    body = table.drop(columns=keys).T
    body.columns = names
    return body.rename_axis(label or ", ".join(keys)).reset_index()


class HtmlTable:
    """A table that notebooks show as compact HTML (wrapping cells, no index) and terminals as text."""

    def __init__(self, table: pd.DataFrame, caption: str | None = None):
        self.table = table
        self.caption = caption

    def _repr_html_(self) -> str:
        cell = "padding: 2px 10px; text-align: left; white-space: normal; vertical-align: top"
        head = "".join(f'<th style="{cell}">{_html.escape(str(c))}</th>' for c in self.table.columns)
        body = "".join(
            "<tr>" + "".join(f'<td style="{cell}">{_html.escape(EMPTY if _missing(v) else str(v))}</td>' for v in row) + "</tr>"
            for row in self.table.itertuples(index=False, name=None)
        )
        caption = f'<caption style="text-align: left; caption-side: top">{_html.escape(self.caption)}</caption>' if self.caption else ""
        return (f'<table class="tune-node-table" style="width: auto; max-width: 100%; font-size: 0.9em; table-layout: auto">'
                f"{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        text = self.table.to_string(index=False, na_rep=EMPTY)
        return f"{self.caption}\n{text}" if self.caption else text


def html(table: pd.DataFrame, caption: str | None = None) -> HtmlTable:
    """``table`` for ``display()``: compact HTML, no index column, ``"-"`` for missing cells."""
    return HtmlTable(table, caption)
