"""One bench run in order: the model (and its GGUF) made, each pipeline timed in its own process, the ratios taken."""

import datetime
import os
import platform
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from mobilevlm_ros.bench import BenchOptions, BenchResult
from mobilevlm_ros.bench.harness import Worker, alternate, in_fresh_process
from mobilevlm_ros.bench.llamacpp_mtmd import setup_llamacpp_mtmd
from mobilevlm_ros.bench.pipelines import setup_llamacpp_plain, setup_ours, setup_reference, setup_torch_vision
from mobilevlm_ros.bench.random_model import CHECKPOINT_FORMAT, SIZES, write_random_checkpoint
from mobilevlm_ros.bench.report import ratios
from mobilevlm_ros.choices import vision_precision
from mobilevlm_ros.cpu import RELEVANT_FLAGS, cpu_info

BASELINES = ("reference", "llamacpp-plain", "llamacpp-mtmd")


def run_bench(options: BenchOptions) -> BenchResult:
    """Prepare the model (and GGUF), time each pipeline in its own process, and compute the ratios."""
    if options.size not in SIZES and options.model is None:
        raise ValueError(f"unknown size {options.size!r} (expected {', '.join(SIZES)})")
    unknown = set(options.vs) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)} (expected {', '.join(BASELINES)})")
    work_dir = Path(options.work_dir)
    if options.model is not None:
        model_dir = Path(options.model)
    else:
        model_dir = in_fresh_process(write_random_checkpoint, work_dir / f"{options.size}-random-v{CHECKPOINT_FORMAT}", options.size)
    engines_dir = options.engines_dir or (None if options.model is not None else str(work_dir / "engines"))
    result = BenchResult(options, machine_info(), str(model_dir))
    if options.language == "llamacpp" or {"llamacpp-plain", "llamacpp-mtmd"} & set(options.vs):
        result.gguf = in_fresh_process(build_gguf, str(model_dir), options.quant, engines_dir)
    if "llamacpp-mtmd" in options.vs:
        result.mmproj = in_fresh_process(build_mmproj, str(model_dir), mmproj_type(options), engines_dir)
    precision = vision_precision(options.vision, options.vision_precision)
    vision = "" if options.vision == "torch" else f", {options.vision} {precision} vision"
    ours = f"ours ({options.language} " + (options.quant if options.language == "llamacpp" else options.vision_dtype) + f"{vision})"
    with LoadMonitor() as load:
        with ExitStack() as stack:
            group = {ours: stack.enter_context(Worker(setup_ours, str(model_dir), options, engines_dir))}
            if "llamacpp-plain" in options.vs:
                prompt_tokens = group[ours].run(min(4, options.new_tokens))["prompt_tokens"]  # its warm-up
                group[f"llama-cpp-python plain ({options.quant})"] = stack.enter_context(
                    Worker(setup_llamacpp_plain, str(model_dir), result.gguf["path"], prompt_tokens, options.llama_amx)
                )
            if "llamacpp-mtmd" in options.vs:
                group[f"llama.cpp mtmd ({options.quant}, {result.mmproj['file_type']} mmproj)"] = stack.enter_context(
                    Worker(setup_llamacpp_mtmd, result.gguf["path"], result.mmproj["path"], options.llama_amx)
                )
            if options.vision != "torch":
                torch_vision = Worker(setup_torch_vision, str(model_dir), options)
                group[f"torch eager vision ({options.vision_dtype})"] = stack.enter_context(torch_vision)
            result.pipelines |= alternate(group, options.new_tokens, options.repeats)
        if "reference" in options.vs:
            with Worker(setup_reference, str(model_dir), options) as reference:
                result.pipelines |= alternate({"reference (transformers)": reference}, options.new_tokens, options.repeats)
    result.machine["load_average"] = load.summary()
    result.ratios = ratios(result.pipelines, ours)
    return result


def build_gguf(model_dir: str, quant: str, engines_dir: str | None) -> dict[str, Any]:
    """The GGUF of the checkpoint (from the artifact cache, or built now), as the report shows it."""
    from mobilevlm_ros.export.gguf import llm_gguf_artifact

    artifact = llm_gguf_artifact(model_dir, quant, engines_dir)
    return {"path": str(artifact.path), "size_mb": artifact.manifest["size"] / 1e6, "built_now": artifact.built,
            "build_s": artifact.manifest["build_seconds"], "tensor_types": artifact.manifest["details"].get("tensor_types")}


class LoadMonitor:
    """The machine's 1-minute load average, read every `interval` seconds while pipelines are timed: on a shared
    machine, how busy it was besides them (the timed pipeline itself adds up to its thread count)."""

    def __init__(self, interval: float = 5.0):
        self.samples: list[float] = []
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> "LoadMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples), "samples": len(self.samples)}


def mmproj_type(options: BenchOptions) -> str:
    """The mmproj llama.cpp's mtmd runs: f16 (llama.cpp's usual, and our ggml backend's default), or the type our
    pipeline's ggml vision backend runs when it is the one timed."""
    if options.vision == "ggml":
        return {"fp16": "f16", "fp32": "f32"}[vision_precision("ggml", options.vision_precision)]
    return "f16"


def build_mmproj(model_dir: str, file_type: str, engines_dir: str | None) -> dict[str, Any]:
    """The checkpoint's mmproj (from the artifact cache, or written now), the same file our ggml backend runs."""
    from mobilevlm_ros.export.mmproj import mmproj_artifact

    artifact = mmproj_artifact(model_dir, file_type, engines_dir)
    return {"path": str(artifact.path), "file_type": file_type, "size_mb": artifact.manifest["size"] / 1e6,
            "built_now": artifact.built, "build_s": artifact.manifest["build_seconds"],
            "cls_layout": artifact.manifest["details"].get("cls_layout")}


def machine_info() -> dict[str, Any]:
    """Where the figures were taken: the CPU, its features that change the kernels, the library versions."""
    cpu = cpu_info()
    info = {"cpu": cpu.model, "cpus": cpu.cpus, "cores": cpu.cores, "cpu_flags": [f for f in RELEVANT_FLAGS if f in cpu.flags],
            "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return info
