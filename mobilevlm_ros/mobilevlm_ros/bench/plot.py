"""`mobilevlm bench --plot FILE.png`: where each pipeline's image -> answer time goes, and its decode speed.

Left: one stacked horizontal bar per pipeline, in seconds: preprocessing, vision (tower + projector, or mtmd's
encode), prefill (time to first token less the two) and decode (the rest of the answer). A pipeline that only times
vision (torch eager vision) has its vision bar alone; llama-cpp-python plain has no image, so no vision. Right: decode
tokens per second. Titled with the model, the CPU line the bench records and the date. matplotlib with its Agg
backend (files only, no display), imported only when a plot is asked for.
"""

from pathlib import Path
from typing import Any

from mobilevlm_ros.bench import BenchResult
from mobilevlm_ros.bench.report import load_line, machine_line

STAGES = ("preprocess", "vision", "prefill", "decode")
COLOURS = {"preprocess": "#9ecae1", "vision": "#3182bd", "prefill": "#fd8d3c", "decode": "#74c476"}


def stage_seconds(figures: dict[str, Any]) -> dict[str, float]:
    """A pipeline's medians -> seconds per stage (absent stages 0)."""
    preprocess = figures.get("preprocess_ms", 0.0) / 1e3
    vision = figures.get("vision_ms", 0.0) / 1e3
    stages = {"preprocess": preprocess, "vision": vision, "prefill": 0.0, "decode": 0.0}
    if "ttft_s" in figures:
        stages["prefill"] = max(figures["ttft_s"] - preprocess - vision, 0.0)
        stages["decode"] = max(figures.get("answer_s", figures["ttft_s"]) - figures["ttft_s"], 0.0)
    return stages


def title(result: BenchResult) -> str:
    options = result.options
    model = options.model or f"MobileVLM {options.size} dims (random weights)"
    date = result.machine.get("date", "")
    load = f"; {load_line(result.machine['load_average'])}" if "load_average" in result.machine else ""
    return (f"{model}: image -> {options.new_tokens}-token answer, median of {options.repeats}   {date}\n"
            f"CPU: {machine_line(result.machine)}{load}")


def plot(result: BenchResult, path: str | Path) -> Path:
    """Write the chart of `result` as a PNG (about 1000 px wide: readable at README width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, figures in result.pipelines.items() if "ttft_s" in figures or "vision_ms" in figures]
    stages = [stage_seconds(result.pipelines[name]) for name in names]
    figure, (times, speeds) = plt.subplots(
        1, 2, figsize=(10, 1.9 + 0.55 * len(names)), dpi=100, width_ratios=(3, 1), sharey=True, layout="constrained"
    )
    rows = range(len(names))
    left = [0.0] * len(names)
    for stage in STAGES:
        widths = [seconds[stage] for seconds in stages]
        times.barh(rows, widths, left=left, color=COLOURS[stage], label=stage, height=0.6)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for row, total in zip(rows, left, strict=True):
        times.text(total, row, f" {total:.2f} s", va="center", fontsize=8)
    times.set_yticks(list(rows), [_wrap(name) for name in names], fontsize=8)
    times.invert_yaxis()
    times.set_xlabel("seconds (image -> answer; vision only for torch eager vision)")
    times.set_xlim(0, max(left, default=1) * 1.18 or 1)
    times.legend(ncols=4, fontsize=8, loc="lower left", bbox_to_anchor=(0, 1), frameon=False)
    times.grid(axis="x", alpha=0.3)

    speed_rows = [row for row, name in zip(rows, names, strict=True) if "decode_tok_s" in result.pipelines[name]]
    values = [result.pipelines[names[row]]["decode_tok_s"] for row in speed_rows]
    speeds.barh(speed_rows, values, color=COLOURS["decode"], height=0.6)
    for row, value in zip(speed_rows, values, strict=True):
        speeds.text(value, row, f" {value:.1f}", va="center", fontsize=8)
    speeds.tick_params(axis="y", left=False)
    speeds.set_xlabel("decode tokens / s")
    speeds.set_xlim(0, max(values, default=1) * 1.3)
    speeds.grid(axis="x", alpha=0.3)
    figure.suptitle(title(result), fontsize=9)
    path = Path(path)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def _wrap(name: str) -> str:
    """Pipeline names break before their parenthesis, to keep the axis narrow."""
    return name.replace(" (", "\n(", 1)
