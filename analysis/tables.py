"""Paper tables from the aggregate frame: the Spec-Bench main table, quality, and the cost model.

A :class:`PaperTable` holds numbers (mean and std over repeats), not strings; the renderers turn
it into Markdown (pipe table), LaTeX (booktabs, grouped column headers) or CSV (numbers with
``_std`` columns). Cells read ``mean ± std`` when there is more than one repeat. The best value of
each column among the non-baseline methods is bold (every metric here is higher-is-better); rows
labelled ``"... (baseline)"`` and dedicated ``ar`` runs are never best. Missing values show as "-" (empty in CSV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from decodebench.analysis.cost_model import PREDICTION_METRICS
from decodebench.analysis.frame import QUALITY_PREFIX, quality_metrics
from decodebench.analysis.report import BASELINE_SUFFIX, OVERALL

# Spec-Bench's column headers for its six category groups.
GROUP_NAMES = {
    "mt_bench": "MT-Bench",
    "translation": "Translation",
    "summarization": "Summarization",
    "qa": "QA",
    "math_reasoning": "Math",
    "rag": "RAG",
    OVERALL: "Overall",
}
METRIC_NAMES = {
    "speedup": "Speedup",
    "speedup_tps": "Speedup (tok/s)",
    "tau": "τ",
    "alpha": "α",
    "tokens_per_s": "tok/s",
    "lossless_rate": "Lossless",
    "predicted_speedup": "Predicted",
    "measured_decode_speedup": "Measured (decode)",
    "measured_speedup": "Measured (wall)",
    "tokens_per_step": "Tokens/step",
    "verify_ratio": "T(k)/T(1)",
    "draft_share": "Draft/T(1)",
    "prefill_frac": "Prefill %",
    "draft_frac": "Draft %",
    "verify_frac": "Verify %",
    "overhead_frac": "Overhead %",
    "latency_p50_ms": "p50 ms/token",
    "latency_p95_ms": "p95 ms/token",
    "latency_p99_ms": "p99 ms/token",
    "mean_accepted_tokens": "Mean accepted tokens",
}
LATEX_METRIC_NAMES = {
    "tau": r"$\tau$",
    "alpha": r"$\alpha$",
    "verify_ratio": r"$T(k)/T(1)$",
    "draft_share": r"Draft$/T(1)$",
    "prefill_frac": r"Prefill \%",
    "draft_frac": r"Draft \%",
    "verify_frac": r"Verify \%",
    "overhead_frac": r"Overhead \%",
}
PERCENT = ("prefill_frac", "draft_frac", "verify_frac", "overhead_frac")
FORMATS = ("md", "latex", "csv")


@dataclass
class PaperTable:
    """Rows = methods; columns = (block, metric) pairs; ``std`` aligned with ``mean`` (may be NaN)."""

    title: str
    mean: pd.DataFrame  # index: method labels; columns: MultiIndex (block, metric)
    std: pd.DataFrame
    bold_best: bool = True
    digits: int = 2
    notes: list[str] = field(default_factory=list)

    def best(self) -> pd.DataFrame:
        """True where a value is the column maximum among non-baseline rows."""
        mask = pd.DataFrame(False, index=self.mean.index, columns=self.mean.columns)
        if not self.bold_best:
            return mask
        candidates = ~self.mean.index.to_series().map(is_reference).to_numpy()
        for column in self.mean.columns:
            values = self.mean[column].where(candidates).astype(float)
            if values.nunique() > 1 or values.notna().sum() == 1:  # a tie of all is no "best"
                mask[column] = candidates & (values == values.max()).to_numpy()
        return mask


def is_reference(label: str) -> bool:
    """AR rows (in-process ``"ar (baseline)"`` or a dedicated ``ar`` run) are references, never best."""
    return label.endswith(BASELINE_SUFFIX) or label == "ar" or label.startswith("ar[")


def _name(metric: str, latex: bool = False) -> str:
    if metric.startswith(QUALITY_PREFIX):
        metric = metric[len(QUALITY_PREFIX) :]
    if latex and metric in LATEX_METRIC_NAMES:
        return LATEX_METRIC_NAMES[metric]
    name = METRIC_NAMES.get(metric, metric)
    return _latex_escape(name) if latex else name


def _pivot(agg: pd.DataFrame, blocks: list[str], metrics: list[str], title: str) -> PaperTable:
    methods = list(dict.fromkeys(agg["method"]))
    columns = pd.MultiIndex.from_tuples([(b, m) for b in blocks for m in metrics])
    mean = pd.DataFrame(math.nan, index=methods, columns=columns)
    std = mean.copy()
    for row in agg.to_dict("records"):
        for metric in metrics:
            if (row["group"], metric) in columns:
                mean.loc[row["method"], (row["group"], metric)] = row.get(metric, math.nan)
                std.loc[row["method"], (row["group"], metric)] = row.get(f"{metric}_std", math.nan)
    return PaperTable(title, mean, std)


def main_table(agg: pd.DataFrame, model: str, task: str, metrics: tuple[str, ...] = ("speedup", "tau")) -> PaperTable:
    """Spec-Bench's main table: methods × (category groups + overall) × (speedup, τ)."""
    rows = agg[(agg["model"] == model) & (agg["task"] == task)]
    groups = list(dict.fromkeys(rows["group"]))
    blocks = [g for g in groups if g != OVERALL] + [OVERALL]
    if len(blocks) == 2:  # a single-group task: its group equals overall
        blocks = [OVERALL]
    table = _pivot(rows, blocks, list(metrics), f"Speedup and τ over AR — {task}, {model}")
    table.notes.append(
        "speedup = Σ AR wall time / Σ method wall time on the same prompts and machine; "
        "τ = emitted tokens / target forwards. Mean ± std over repeats; best in bold. 95 % bootstrap "
        "intervals over prompts: aggregate.csv (speedup_lo/hi, tau_lo/hi), the report and the figures."
    )
    return table


def quality_table(agg: pd.DataFrame, model: str, task: str) -> PaperTable | None:
    """Overall speed next to every quality metric (None when no record carries quality)."""
    rows = agg[(agg["model"] == model) & (agg["task"] == task) & (agg["group"] == OVERALL)]
    metrics = [QUALITY_PREFIX + m for m in quality_metrics(rows) if rows[QUALITY_PREFIX + m].notna().any()]
    if not metrics:
        return None
    table = _pivot(rows, [OVERALL], ["speedup", "tau", "lossless_rate", *metrics], f"Quality — {task}, {model}")
    table.notes.append(
        "quality = mean of each task metric over the records that report it; lossless = "
        "fraction of greedy outputs identical to AR (lossless methods)."
    )
    return table


def latency_table(agg: pd.DataFrame, model: str, task: str) -> PaperTable | None:
    """Per-token decode latency percentiles per method (overall rows; lower is better, nothing bold)."""
    rows = agg[(agg["model"] == model) & (agg["task"] == task) & (agg["group"] == OVERALL)]
    metrics = ["latency_p50_ms", "latency_p95_ms", "latency_p99_ms"]
    if rows.empty or rows[metrics].isna().all().all():
        return None
    table = _pivot(rows, [OVERALL], metrics, f"Per-token latency — {task}, {model}")
    table.bold_best = False
    table.notes.append(
        "(wall − prefill) / (new tokens − 1) per record, in ms; percentiles over the records of all repeats."
    )
    return table


def cost_table(cost: pd.DataFrame, model: str, task: str) -> PaperTable | None:
    """The cost model's prediction next to the measured speedup and time split (overall rows)."""
    rows = cost[(cost["model"] == model) & (cost["task"] == task) & (cost["group"] == OVERALL)]
    if rows.empty:
        return None
    table = _pivot(rows, [OVERALL], PREDICTION_METRICS, f"Cost model: predicted vs measured speedup — {task}, {model}")
    table.bold_best = False
    curves = ", ".join(dict.fromkeys(c for c in rows["curve"].dropna()))
    table.notes.append(
        "predicted = tokens/step ÷ (T(k)/T(1) + draft/T(1)), decode phase, with T(1) the AR step "
        "measured in the run; measured (decode) excludes prefill from both sides. Time split: share "
        "of the method's wall time; overhead = wall − prefill − draft − verify. "
        + (f"Curve: {curves}." if curves else "No verify-latency curve: no prediction.")
    )
    return table


# -- rendering -------------------------------------------------------------------------------------


def _number(value: float, metric: str, digits: int) -> str:
    return f"{100 * value:.0f}" if metric in PERCENT else f"{value:.{digits}f}"


def _cell(table: PaperTable, method: str, column: tuple[str, str], bold: bool, latex: bool) -> str:
    value, spread = table.mean.loc[method, column], table.std.loc[method, column]
    if pd.isna(value):
        return "-"
    text = _number(value, column[1], table.digits)
    if bold:
        text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
    if not pd.isna(spread):
        spread_text = _number(spread, column[1], table.digits)
        text += rf" {{\scriptsize$\pm${spread_text}}}" if latex else f" ± {spread_text}"
    return text


def _headers(table: PaperTable, latex: bool) -> list[str]:
    blocks = list(dict.fromkeys(b for b, _ in table.mean.columns))
    single = len(blocks) == 1
    names = []
    for block, metric in table.mean.columns:
        metric_name = _name(metric, latex)
        names.append(metric_name if single else f"{GROUP_NAMES.get(block, block)} {metric_name}")
    return names


def render_markdown(table: PaperTable) -> str:
    best = table.best()
    headers = ["Method", *_headers(table, latex=False)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for method in table.mean.index:
        cells = [_cell(table, method, c, best.loc[method, c], latex=False) for c in table.mean.columns]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("$", r"\$"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("~", r"\textasciitilde{}"),
        ("^", r"\textasciicircum{}"),
        ("τ", r"$\tau$"),
        ("α", r"$\alpha$"),
    ):
        text = text.replace(char, escaped)
    return text


def render_latex(table: PaperTable) -> str:
    """booktabs tabular; a group header row with ``\\cmidrule`` when there are several blocks."""
    best = table.best()
    blocks = list(dict.fromkeys(b for b, _ in table.mean.columns))
    per_block = len(table.mean.columns) // len(blocks)
    lines = [f"% {_latex_escape(table.title)}", r"\begin{tabular}{l" + "r" * len(table.mean.columns) + "}", r"\toprule"]
    if len(blocks) > 1:
        spans = [rf"\multicolumn{{{per_block}}}{{c}}{{{_latex_escape(GROUP_NAMES.get(b, b))}}}" for b in blocks]
        lines.append(" & ".join(["", *spans]) + r" \\")
        lines.append(
            " ".join(rf"\cmidrule(lr){{{2 + i * per_block}-{1 + (i + 1) * per_block}}}" for i in range(len(blocks)))
        )
        metric_names = [_name(m, latex=True) for _, m in table.mean.columns]
    else:
        metric_names = _headers(table, latex=True)
    lines.append(" & ".join(["Method", *metric_names]) + r" \\")
    lines.append(r"\midrule")
    for method in table.mean.index:
        cells = [_cell(table, method, c, best.loc[method, c], latex=True) for c in table.mean.columns]
        lines.append(" & ".join([_latex_escape(method), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_csv(table: PaperTable) -> str:
    """Numbers only: ``<block> <metric>`` and ``<block> <metric>_std`` columns."""
    columns = {}
    for block, metric in table.mean.columns:
        name = metric if len(set(b for b, _ in table.mean.columns)) == 1 else f"{block} {metric}"
        columns[name] = table.mean[(block, metric)]
        if table.std[(block, metric)].notna().any():
            columns[f"{name}_std"] = table.std[(block, metric)]
    frame = pd.DataFrame(columns).rename_axis("method").reset_index()
    return frame.to_csv(index=False, float_format="%.4f")


def render(table: PaperTable, fmt: str) -> str:
    renderers = {"md": render_markdown, "latex": render_latex, "csv": render_csv}
    return renderers[fmt](table)
