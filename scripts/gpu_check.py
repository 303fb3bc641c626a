#!/usr/bin/env python3
"""The GPU and Jetson path in one run: what is installed, and whether the CUDA-graph decode, the sessions, the vision
tower, the ONNX exports and TensorRT work and how fast, at MobileVLM 1.7B's dimensions with random weights.

    python scripts/gpu_check.py --out gpu-check.json                         # a CUDA GPU, MobileVLM 1.7B dims
    python scripts/gpu_check.py --device cpu --size tiny --out cpu.json      # the same code on a CPU, in seconds

Sections (each in its own try/except: a failure is recorded with its traceback and the rest still run; the JSON is
rewritten after every section, so a run cut short keeps what it measured):
  versions        torch, CUDA, GPU name / SM / SM count / memory, TensorRT (and what it builds), ONNX Runtime providers,
                  llama-cpp-python, whether it has GPU offload and its GPU devices
  checkpoint      a random checkpoint of the size (mobilevlm_ros.bench.write_random_checkpoint), reused across runs
  load            MobileVLM.from_pretrained on the device (fp16 on CUDA, fp32 on the CPU): the weights' size, the peak of
                  CUDA memory allocated and of host RSS growth while loading (weights go straight to the device: both
                  about one copy of the weights, the host's near zero on CUDA)
  decode          greedy decode, static KV cache with the CUDA-graph step vs eager (dynamic cache): identical tokens?
                  tokens/s of each (MobileLLaMA-1.4B dims for --size 1.7b)
  sessions        5 sessions in a row (a frame each, one answer each): GPU memory allocated / reserved / peak after each,
                  and whether all of them used the backend's one static KV buffer and one captured decode graph
  vision          tower + projector latency at batch 1 and 7 in the model's dtype (fp16 on CUDA)
  onnx            export at opset 17 and 16, each loaded in ONNX Runtime and compared with torch fp32; the fp16 graph
                  TensorRT 11 builds from, compared with the fp32 graph
  tensorrt        when `tensorrt` imports and CUDA is there: fp16 and fp32 engines built and run at batch 1 and 7,
                  compared with torch fp32 (else skipped, with the reason)
  choose          Session.choose latency with 4 options
  llamacpp        when llama-cpp-python has a GPU backend: the Q4_K_S GGUF of the checkpoint (built once into the work
                  directory), every layer offloaded, flash attention automatic: where the weights went, prefill and
                  decode tokens/s (else skipped, with the reason)
The whole run stays within --budget-s (default 480 s): a section that would start past it is skipped and says so.
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

# This checkout's package first (as `PYTHONPATH=mobilevlm_ros` would), then whatever is installed.
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "mobilevlm_ros"
if (PACKAGE_DIR / "mobilevlm_ros" / "__init__.py").is_file():
    sys.path.insert(0, str(PACKAGE_DIR))

OPTIONS = ["move_forward", "turn_left", "turn_right", "stop"]
QUESTION = "What is in the image? Describe the scene in detail."


class Skip(Exception):
    """A section that cannot run here: recorded as `skipped: <reason>`, not as an error."""


class Check:
    """Runs the sections, keeps their results, writes the JSON after each one."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.perf_counter()
        self.state: dict[str, Any] = {}  # what sections hand on: the checkpoint, the loaded model, graphs
        self.report: dict[str, Any] = {
            "script": "scripts/gpu_check.py", "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": {k: str(v) for k, v in vars(args).items()}, "sections": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def section(self, name: str, function: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()) -> None:
        if self.args.sections and name not in self.args.sections:
            return
        started = time.perf_counter()
        if self.elapsed() > self.args.budget_s:
            result = {"status": f"skipped: the time budget ({self.args.budget_s:.0f} s) is spent"}
        elif missing := [need for need in needs if need not in self.state]:
            result = {"status": f"skipped: needs {', '.join(missing)}, which an earlier section did not provide"}
        else:
            try:
                result = {"status": "ok", **function()}
            except Skip as reason:
                result = {"status": f"skipped: {reason}"}
            except Exception as error:  # noqa: BLE001 (recorded; the other sections still run)
                result = {"status": "error", "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc(limit=8)[-4000:]}
        result["seconds"] = round(time.perf_counter() - started, 2)
        self.report["sections"][name] = result
        print(f"[{self.elapsed():6.1f} s] {name}: {result['status']}" + (f" ({result['error']})" if "error" in result else ""),
              flush=True)
        self.write()

    def write(self) -> None:
        self.report["total_seconds"] = round(self.elapsed(), 2)
        if self.args.out:
            out = Path(self.args.out)
            temporary = out.with_name(f".{out.name}.tmp")
            temporary.write_text(json.dumps(self.report, indent=2, default=str) + "\n", encoding="utf-8")
            os.replace(temporary, out)


def cuda_device(args: argparse.Namespace) -> Any:
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA")
    return device


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: Any, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `function` after `warmup` calls, synchronizing the device around each call."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def frame() -> Any:
    from mobilevlm_ros.bench.workload import bench_frame

    return bench_frame()


# --- sections --------------------------------------------------------------------------------------------------------

def versions(check: Check) -> dict[str, Any]:
    import torch

    import mobilevlm_ros

    info: dict[str, Any] = {"package": str(Path(mobilevlm_ros.__file__).parent), "python": platform.python_version(),
                            "machine": platform.machine(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": properties.name, "sm": f"{properties.major}{properties.minor}",
                       "sm_count": properties.multi_processor_count, "memory_gb": round(properties.total_memory / 2**30, 2)}
        info["cudnn"] = torch.backends.cudnn.version()
    for module in ("transformers", "onnx"):
        try:
            info[module] = __import__(module).__version__
        except ImportError as error:
            info[module] = f"not importable: {error}"
    try:
        import onnxruntime

        info["onnxruntime"] = {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
    except ImportError as error:
        info["onnxruntime"] = f"not importable: {error}"
    try:
        import tensorrt

        from mobilevlm_ros.tensorrt_support import describe_precisions, tensorrt_unavailable_reason

        info["tensorrt"] = {"version": tensorrt.__version__, "builds": describe_precisions(tensorrt),
                            "runs_here": tensorrt_unavailable_reason() or "yes"}
    except ImportError as error:
        info["tensorrt"] = f"not importable: {error}"
    try:
        import llama_cpp

        from mobilevlm_ros.ggml import gpu_devices

        info["llama_cpp_python"] = {"version": llama_cpp.__version__, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
                                    "gpu_devices": gpu_devices()}
    except Exception as error:  # a broken native library raises more than ImportError
        info["llama_cpp_python"] = f"not importable: {type(error).__name__}: {error}"
    return info


def checkpoint(check: Check) -> dict[str, Any]:
    from mobilevlm_ros.bench.random_model import write_random_checkpoint

    directory = Path(check.args.work_dir) / f"random-{check.args.size}"
    existed = (directory / "config.json").is_file()
    check.state["checkpoint"] = write_random_checkpoint(directory, check.args.size)
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())
    return {"path": str(directory), "reused": existed, "size_mb": round(size / 1e6, 1)}


def proc_status(field: str) -> int | None:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM), None where there is no such file."""
    try:
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: `5` into clear_refs), so a later VmHWM is this step's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load(check: Check) -> dict[str, Any]:
    import torch

    from mobilevlm_ros.runtime.vlm import MobileVLM

    device = cuda_device(check.args)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    rss_before, peak_reset = proc_status("VmRSS"), reset_peak_rss()
    started = time.perf_counter()
    vlm = MobileVLM.from_pretrained(check.state["checkpoint"], device=device, dtype=dtype)
    check.state["vlm"] = vlm
    load_s = time.perf_counter() - started
    weights = sum(t.numel() * t.element_size() for module in (vlm.language.model,) for t in module.state_dict().values())
    result = {"device": str(device), "dtype": str(dtype), "load_s": round(load_s, 2), "weights_mb": round(weights / 2**20, 1)}
    if peak_reset and rss_before is not None:
        result["host_peak_rss_growth_mb"] = round((proc_status("VmHWM") - rss_before) / 2**20, 1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - allocated_before
        result |= {"allocated_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1), "cuda_peak_mb": round(peak / 2**20, 1),
                   "cuda_peak_over_weights": round(peak / weights, 3)}
    return result


def decode_tokens(language: Any, prompt: list[int], count: int, device: Any) -> tuple[list[int], float]:
    """Greedy: prefill `prompt`, then `count` single-token steps; returns the tokens and the decode seconds."""
    cache = language.new_cache()
    logits = cache.append_tokens(prompt)
    tokens = []
    synchronize(device)
    started = time.perf_counter()
    for _ in range(count):
        tokens.append(int(logits.argmax()))
        logits = cache.append_tokens([tokens[-1]])
    synchronize(device)
    return tokens, time.perf_counter() - started


def decode(check: Check) -> dict[str, Any]:
    import torch

    from mobilevlm_ros.runtime.language import TorchLanguageModel

    vlm = check.state["vlm"]
    device = vlm.language.model.device
    count = check.args.new_tokens
    generator = torch.Generator().manual_seed(0)
    text = vlm.config.text_config
    prompt = [vlm.tokenizer.bos_id] + torch.randint(3, text.vocab_size, (63,), generator=generator).tolist()
    eager = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=False)
    static = TorchLanguageModel(vlm.language.model, vlm.config.context_length, static_cache=True)
    decode_tokens(eager, prompt, 4, device)  # warm-up (kernels, allocator)
    eager_tokens, eager_s = decode_tokens(eager, prompt, count, device)
    first_tokens, first_s = decode_tokens(static, prompt, count, device)  # on CUDA: captures the graph at step 1
    static_tokens, static_s = decode_tokens(static, prompt, count, device)
    graph = device.type == "cuda"
    result = {
        "llm": {k: getattr(text, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")},
        "dtype": str(vlm.language.model.dtype), "prompt_tokens": len(prompt), "new_tokens": count,
        "eager_tok_s": round(count / eager_s, 1),
        "static_tok_s": round(count / static_s, 1), "static_first_session_tok_s": round(count / first_s, 1),
        "identical_tokens": static_tokens == eager_tokens == first_tokens,
        "cuda_graph": "yes" if graph else "skipped: no CUDA (static cache without a graph on the CPU)",
    }
    if not result["identical_tokens"]:
        result["first_difference"] = next(i for i, (a, b) in enumerate(zip(static_tokens, eager_tokens, strict=True)) if a != b) \
            if static_tokens != eager_tokens else None
    return result


def sessions(check: Check) -> dict[str, Any]:
    import torch

    from mobilevlm_ros.runtime.sampling import SamplingParams

    vlm = check.state["vlm"]
    device = vlm.language.model.device
    params = SamplingParams(max_new_tokens=16, min_new_tokens=16)
    image = frame()
    rows = []
    session = None
    static = getattr(vlm.language, "static_cache", False)
    for index in range(5):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        session = vlm.session(image)  # the previous session is dropped here, as the node drops a frame's session
        answer = session.ask(QUESTION, params)
        synchronize(device)
        row = {"session": index + 1, "seconds": round(time.perf_counter() - started, 3), "tokens": answer.generated_tokens}
        if device.type == "cuda":
            row |= {"allocated_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1),
                    "reserved_mb": round(torch.cuda.memory_reserved(device) / 2**20, 1),
                    "peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
        else:
            row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if static:
            shared = vlm.language.shared_static_cache()
            row["kv_buffer"] = shared.cache.layers[0].keys.data_ptr() if shared.cache.layers[0].is_initialized else None
            row["decode_graph"] = id(shared._graph) if shared._graph is not None else None
        rows.append(row)
    del session
    gc.collect()
    result = {"sessions": rows, "gpu_memory": "measured" if device.type == "cuda" else "skipped: no CUDA (peak RSS instead)"}
    if static:
        result["one_kv_buffer"] = len({row["kv_buffer"] for row in rows}) == 1
        result["one_decode_graph"] = len({row["decode_graph"] for row in rows}) == 1 if device.type == "cuda" else \
            "skipped: no CUDA (no graph)"
    else:
        result["one_kv_buffer"] = "skipped: dynamic KV caches (the language backend's default on the CPU)"
    return result


def vision(check: Check) -> dict[str, Any]:
    import torch

    vlm = check.state["vlm"]
    device, dtype = vlm.device, vlm.vision.vision_path.dtype
    result: dict[str, Any] = {"dtype": str(dtype), "backend": vlm.vision.name}
    for batch in (1, 7):
        pixels = vlm.image_processor.batch([frame()] * batch).to(device, dtype)
        with torch.inference_mode():
            seconds = timed(partial(vlm.vision, pixels), device, check.args.repeats)
        result[f"batch_{batch}_ms"] = round(seconds * 1e3, 2)
    return result


def compare(ours: Any, expected: Any) -> dict[str, float]:
    import torch

    ours, expected = ours.float().flatten().cpu(), expected.float().flatten().cpu()
    return {"max_abs": float((ours - expected).abs().max()), "max_abs_value": float(expected.abs().max()),
            "cosine": float(torch.nn.functional.cosine_similarity(ours, expected, dim=0))}


def reference(check: Check) -> Any:
    """The checkpoint's vision tower + projector in fp32 on the CPU (what graphs and engines are compared with), and
    its image processor."""
    if "reference" not in check.state:
        import torch

        from mobilevlm_ros.model.checkpoint import load_checkpoint

        check.state["reference"] = load_checkpoint(check.state["checkpoint"], dtype=torch.float32, device="cpu",
                                                   with_language_model=False)
    return check.state["reference"]


def pixels(check: Check, batch: int) -> Any:
    """`batch` camera frames through the checkpoint's preprocessing (fp32, CPU)."""
    return reference(check).image_processor.batch([frame()] * batch)


def onnx_exports(check: Check) -> dict[str, Any]:
    import torch

    from mobilevlm_ros.export.onnx import export_onnx
    from mobilevlm_ros.export.onnx_fp16 import write_fp16_graph
    from mobilevlm_ros.runtime.vision import OnnxRuntimeVision, TorchVision

    vision = reference(check).model.vision_path
    x = pixels(check, 1)
    with torch.inference_mode():
        expected = TorchVision(vision)(x)
    directory = Path(check.args.work_dir) / f"graphs-{check.args.size}"
    directory.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    for opset in (17, 16):
        path = directory / f"vision-opset{opset}.onnx"
        started = time.perf_counter()
        details = export_onnx(vision, path, opset=opset)
        export_s = time.perf_counter() - started
        ours = OnnxRuntimeVision(path, torch.device("cpu"))(x)
        result[f"opset_{opset}"] = {"export_s": round(export_s, 1), "external_data": details.get("external_data"),
                                    "layer_norm_ops": _count_ops(path, "LayerNormalization"), **compare(ours, expected)}
        check.state[f"graph_{opset}"] = path
    half = directory / "vision-fp16.onnx"
    started = time.perf_counter()
    details = write_fp16_graph(check.state["graph_17"], half)
    ours = OnnxRuntimeVision(half, torch.device("cpu"))(x)
    result["fp16_graph"] = {"convert_s": round(time.perf_counter() - started, 1), "kept_fp32_nodes": details["kept_fp32_nodes"],
                            "vs_torch_fp32": compare(ours, expected)}
    check.state["graph_fp16"] = half
    return result


def _count_ops(path: Path, op_type: str) -> int:
    import onnx

    return sum(node.op_type == op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def tensorrt_engines(check: Check) -> dict[str, Any]:
    import torch

    from mobilevlm_ros.tensorrt_support import tensorrt_unavailable_reason

    if reason := tensorrt_unavailable_reason():
        raise Skip(reason)
    import tensorrt as trt

    from mobilevlm_ros.export.tensorrt import build_engine, build_plan, timing_cache_path
    from mobilevlm_ros.runtime.tensorrt import TensorRTVision
    from mobilevlm_ros.runtime.vision import TorchVision

    checkpoint = reference(check)
    x, batch7 = pixels(check, 1), pixels(check, 7).to("cuda")
    with torch.inference_mode():
        expected = TorchVision(checkpoint.model.vision_path)(x)
    directory = Path(check.args.work_dir) / f"engines-{check.args.size}"
    directory.mkdir(parents=True, exist_ok=True)
    image_size = checkpoint.image_processor.crop_size
    result: dict[str, Any] = {"version": trt.__version__}
    for precision in ("fp16", "fp32"):
        if check.elapsed() > check.args.budget_s - 60:
            result[precision] = {"status": "skipped: too little of the time budget left for another build"}
            continue
        plan = build_plan(trt, precision)
        graph = check.state.get("graph_fp16" if plan.graph == "fp16" else "graph_17")
        if graph is None:
            raise Skip("the onnx section made no graph to build from")
        engine_path = directory / f"vision-{precision}.engine"
        started = time.perf_counter()
        details = build_engine(graph, engine_path, precision, image_size, max_batch=8,
                               timing_cache_path=timing_cache_path(directory, trt.__version__, torch.cuda.get_device_name(), precision))
        build_s = time.perf_counter() - started
        engine = TensorRTVision(engine_path, torch.device("cuda"))
        device = torch.device("cuda")
        batch1 = x.to(device)
        ours = engine(batch1)
        result[precision] = {
            "build_s": round(build_s, 1), "plan": plan.key_fields, "size_mb": round(engine_path.stat().st_size / 1e6, 1),
            "batch_1_ms": round(timed(partial(engine, batch1), device, check.args.repeats) * 1e3, 2),
            "batch_7_ms": round(timed(partial(engine, batch7), device, check.args.repeats) * 1e3, 2),
            "vs_torch_fp32": compare(ours, expected), "details": details,
        }
        del engine
    return result


def choose(check: Check) -> dict[str, Any]:
    vlm = check.state["vlm"]
    device = vlm.language.model.device
    session = vlm.session(frame())
    choice = session.choose("Go to the red door.", OPTIONS)
    seconds = timed(lambda: session.choose("Go to the red door.", OPTIONS), device, check.args.repeats, warmup=1)
    return {"options": len(OPTIONS), "median_ms": round(seconds * 1e3, 2), "chosen": choice.option}


def llamacpp(check: Check) -> dict[str, Any]:
    try:
        import llama_cpp
    except Exception as error:  # a broken native library raises more than ImportError
        raise Skip(f"llama-cpp-python does not import ({type(error).__name__}: {error})") from error
    if not llama_cpp.llama_supports_gpu_offload():
        raise Skip(f"llama-cpp-python {llama_cpp.__version__} has no GPU backend (a CPU-only build; README: llama.cpp on a Jetson)")
    import torch

    from mobilevlm_ros.export.gguf import llm_gguf_artifact
    from mobilevlm_ros.ggml import gpu_devices
    from mobilevlm_ros.runtime.llamacpp import LlamaCppLanguageModel

    started = time.perf_counter()
    artifact = llm_gguf_artifact(check.state["checkpoint"], "q4_k_s", Path(check.args.work_dir) / f"engines-{check.args.size}")
    gguf_s = time.perf_counter() - started
    backend = LlamaCppLanguageModel(artifact.path, max_sequences=2)
    vocabulary = backend.vocab_size
    prompt = [1] + torch.randint(3, vocabulary, (63,), generator=torch.Generator().manual_seed(0)).tolist()
    cpu = torch.device("cpu")  # llama_decode returns when the step is done: nothing to synchronize
    decode_tokens(backend, prompt, 4, cpu)  # warm-up
    cache = backend.new_cache()
    prefill_started = time.perf_counter()
    cache.append_tokens(prompt)
    prefill_s = time.perf_counter() - prefill_started
    cache.close()
    tokens, decode_s = decode_tokens(backend, prompt, check.args.new_tokens, cpu)
    result = {
        "gguf": {"path": str(artifact.path), "built": artifact.built, "seconds": round(gguf_s, 1),
                 "size_mb": round(artifact.manifest["size"] / 1e6, 1)},
        "gpu_devices": gpu_devices(), "weights_mib": backend.model_buffers, "flash_attention": backend.flash_attention,
        "prompt_tokens": len(prompt), "prefill_tok_s": round(len(prompt) / prefill_s, 1),
        "new_tokens": len(tokens), "decode_tok_s": round(len(tokens) / decode_s, 1),
    }
    backend.close()
    return result


SECTIONS: list[tuple[str, Callable[[Check], dict[str, Any]], tuple[str, ...]]] = [
    ("versions", versions, ()),
    ("checkpoint", checkpoint, ()),
    ("load", load, ("checkpoint",)),
    ("decode", decode, ("vlm",)),
    ("sessions", sessions, ("vlm",)),
    ("vision", vision, ("vlm",)),
    ("choose", choose, ("vlm",)),
    ("onnx", onnx_exports, ("checkpoint",)),
    ("tensorrt", tensorrt_engines, ("checkpoint",)),
    ("llamacpp", llamacpp, ("checkpoint",)),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check.json", help="where the JSON report goes (default gpu-check.json)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda; sections needing CUDA skip without it)")
    parser.add_argument("--size", default="1.7b", choices=["1.7b", "3b", "tiny"],
                        help="random-weight model of this architecture (default 1.7b: MobileLLaMA-1.4B + CLIP ViT-L/14-336)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "mobilevlm-gpu-check"),
                        help="where the checkpoint, graphs and engines go; reused by the next run")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps per timed run (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats for medians (default 5)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="no section starts after this many seconds (default 480)")
    parser.add_argument("--sections", nargs="+", choices=[name for name, _, _ in SECTIONS], help="run only these sections")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    check = Check(args)
    for name, function, needs in SECTIONS:
        check.section(name, lambda function=function: function(check), needs)
    check.write()
    errors = [name for name, section in check.report["sections"].items() if section["status"] == "error"]
    print(f"report: {args.out}; {len(errors)} section(s) failed{': ' + ', '.join(errors) if errors else ''}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
