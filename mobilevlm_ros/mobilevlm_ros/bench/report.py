"""The bench's results as ratios against their targets, a Markdown table and JSON.

TARGETS is the table of what the bench is for: each ratio, how it is computed from our pipeline's figures and a
baseline's, and the value it should reach (or none: a ratio that is only reported). A ratio is reported when its
baseline ran.
"""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mobilevlm_ros.bench import BenchResult

Figures = dict[str, Any]  # one pipeline's medians and what it reports about itself


@dataclass(frozen=True)
class Target:
    name: str
    baseline: str | None  # the pipelines it compares ours with, by name prefix; None: ours alone
    ratio: Callable[[Figures, Figures], float]  # (ours, baseline) -> the measured value
    op: str | None  # "<=" or ">="; None: reported, no target
    limit: float | None = None

    @property
    def text(self) -> str:
        return "-" if self.op is None else f"{self.op} {self.limit:g}"

    def met(self, value: float) -> bool | None:
        if self.op is None:
            return None
        return value <= self.limit if self.op == "<=" else value >= self.limit


MTMD = "llama.cpp mtmd"  # the name of the llamacpp-mtmd pipeline begins so


TARGETS = (
    Target("second-question TTFT / first", None, lambda ours, _: ours["second_ttft_s"] / ours["ttft_s"], "<=", 0.25),
    Target("peak RSS (GB)", None, lambda ours, _: ours["peak_rss_mb"] / 1024, "<=", 2.5),
    Target("image -> answer speed-up vs reference", "reference",
           lambda ours, reference: reference["answer_s"] / ours["answer_s"], ">=", 3),
    Target("decode tok/s vs llama-cpp-python plain", "llama-cpp-python plain",
           lambda ours, plain: ours["decode_tok_s"] / plain["decode_tok_s"], ">=", 0.95),
    Target("vision speed-up vs torch eager", "torch eager vision",
           lambda ours, torch_vision: torch_vision["vision_ms"] / ours["vision_ms"], ">=", 1.3),
    # Against llama.cpp's own image pipeline (issue 24), ours / theirs.
    Target("image -> answer vs llama.cpp mtmd", MTMD, lambda ours, mtmd: ours["answer_s"] / mtmd["answer_s"], "<=", 0.65),
    Target("time to first token vs llama.cpp mtmd", MTMD, lambda ours, mtmd: ours["ttft_s"] / mtmd["ttft_s"], "<=", 0.35),
    Target("2nd question TTFT vs llama.cpp mtmd, new conversation", MTMD,
           lambda ours, mtmd: ours["second_ttft_s"] / mtmd["second_ttft_s"], "<=", 0.05),
    Target("2nd question TTFT vs llama.cpp mtmd with llama-server's prompt cache", MTMD,
           lambda ours, mtmd: ours["second_ttft_s"] / mtmd["second_ttft_cached_s"], None),
    Target("decode tok/s vs llama.cpp mtmd", MTMD, lambda ours, mtmd: ours["decode_tok_s"] / mtmd["decode_tok_s"], ">=", 0.98),
    Target("vision + projector ms vs llama.cpp mtmd's encode", MTMD, lambda ours, mtmd: ours["vision_ms"] / mtmd["vision_ms"], None),
)


def ratios(pipelines: dict[str, Figures], ours: str) -> dict[str, dict[str, Any]]:
    """Every target whose pipelines ran, as measured, in the order the pipelines ran (ours first)."""
    found = {}
    for name, figures in pipelines.items():
        for target in TARGETS:
            if (name == ours) if target.baseline is None else name.startswith(target.baseline):
                value = target.ratio(pipelines[ours], figures)
                found[target.name] = {"value": value, "target": target.text, "met": target.met(value)}
    return found


ROWS = (
    ("load_s", "load (s)", "{:.1f}"),
    ("preprocess_ms", "preprocessing (ms)", "{:.1f}"),
    ("vision_ms", "vision + projector (ms)", "{:.0f}"),
    ("vision_threads", "vision threads", "{:.0f}"),
    ("prompt_tokens", "prompt tokens", "{:.0f}"),
    ("prefill_tok_s", "prefill (tok/s)", "{:.1f}"),
    ("ttft_s", "time to first token (s)", "{:.2f}"),
    ("decode_tok_s", "decode (tok/s)", "{:.2f}"),
    ("generated_tokens", "generated tokens", "{:.0f}"),
    ("answer_s", "image -> answer (s)", "{:.2f}"),
    ("second_ttft_s", "2nd question TTFT, same frame (s)", "{:.3f}"),
    ("second_ttft_cached_s", "2nd question TTFT, same frame, llama-server's prompt cache (s)", "{:.3f}"),
    ("tiles", "tiles mode: tiles of a 1920x1080 frame", "{:.0f}"),
    ("tiles_vision_ms", "tiles mode: vision + projector, overview + tiles (ms)", "{:.0f}"),
    ("tiles_prompt_tokens", "tiles mode: prompt tokens", "{:.0f}"),
    ("tiles_ttft_s", "tiles mode: time to first token (s)", "{:.2f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    ("peak_gpu_mb", "peak GPU memory (MB)", "{:.0f}"),
)


def markdown(result: BenchResult) -> str:
    options = result.options
    names = list(result.pipelines)
    lines = [
        f"MobileVLM bench: {options.model or options.size + ' (random weights)'}, {options.new_tokens} new tokens, "
        f"median of {options.repeats}",
        "",
        "CPU: " + machine_line(result.machine) + (f", {result.machine['date']}" if "date" in result.machine else "")
        + (f"; {load_line(result.machine['load_average'])}" if "load_average" in result.machine else ""),
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key, label, fmt in ROWS:
        if any(key in result.pipelines[name] for name in names):
            cells = [fmt.format(result.pipelines[name][key]) if key in result.pipelines[name] else "-" for name in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if result.gguf:
        gguf = result.gguf
        lines += ["", f"GGUF: {Path(gguf['path']).name}, {gguf['size_mb']:.0f} MB, "
                      f"{'built now' if gguf['built_now'] else 'cached'} (build {gguf['build_s']:.1f} s), tensors {gguf['tensor_types']}"]
    if result.mmproj:
        mmproj = result.mmproj
        lines += ["", f"mmproj: {Path(mmproj['path']).name}, {mmproj['file_type']}, {mmproj['size_mb']:.0f} MB, "
                      f"{'built now' if mmproj['built_now'] else 'cached'} (build {mmproj['build_s']:.1f} s), "
                      f"class token {mmproj.get('cls_layout')}"]
    for name in names:
        if buffers := result.pipelines[name].get("llama_cpp_buffers"):
            lines += ["", f"llama.cpp weights, {name}: " + ", ".join(f"{kind} {mib:.0f} MiB" for kind, mib in buffers.items())]
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---|---|"]
    for name, ratio in result.ratios.items():
        met = "-" if ratio["met"] is None else "yes" if ratio["met"] else "NO"
        lines.append(f"| {name} | {ratio['value']:.3f} | {ratio['target']} | {met} |")
    return "\n".join(lines) + "\n"


def load_line(load: dict[str, float]) -> str:
    return f"load average while timing: mean {load['mean']:.1f}, max {load['max']:.1f}"


def machine_line(machine: dict[str, Any]) -> str:
    """Where the figures were taken, in one line: CPU model, CPUs and cores, the features that change the kernels."""
    return (f"{machine['cpu']}, {machine['cpus']} CPUs ({machine.get('cores', '?')} cores); "
            f"{' '.join(machine.get('cpu_flags', [])) or 'no AVX2/AVX-512/AMX'}"
            + (f"; GPU: {machine['gpu']}" if "gpu" in machine else ""))


def to_json(result: BenchResult) -> str:
    return json.dumps(asdict(result), indent=2) + "\n"
