"""scripts/gpu_check.py on a CPU: --help, every section that can run on a CPU at the tiny size, and the GPU-only parts
recording why they were skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_help_runs_without_a_gpu():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for text in ("--out", "--device", "--size", "--budget-s", "CUDA-graph decode", "tensorrt", "llamacpp"):
        assert text in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA records")
def test_cpu_run_exercises_the_sections_and_records_what_needs_cuda(tmp_path):
    out, work = tmp_path / "cpu.json", tmp_path / "work"
    result = run("--device", "cpu", "--size", "tiny", "--new-tokens", "8", "--repeats", "1", "--out", str(out), "--work-dir", str(work))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == ["versions", "checkpoint", "load", "decode", "sessions", "vision", "choose", "onnx", "tensorrt", "llamacpp"]
    assert all(sections[name]["status"] == "ok" for name in list(sections)[:-2]), {k: v["status"] for k, v in sections.items()}
    load = sections["load"]
    assert load["weights_mb"] > 0 and load["host_peak_rss_growth_mb"] <= 2 * load["weights_mb"] + 64
    assert sections["versions"]["package"] == str(SCRIPT.parents[1] / "mobilevlm_ros" / "mobilevlm_ros")  # this checkout's code
    decode = sections["decode"]
    assert decode["identical_tokens"] and decode["new_tokens"] == 8 and decode["cuda_graph"].startswith("skipped: no CUDA")
    assert [row["session"] for row in sections["sessions"]["sessions"]] == [1, 2, 3, 4, 5]
    assert sections["sessions"]["gpu_memory"].startswith("skipped: no CUDA")
    assert sections["sessions"]["one_kv_buffer"].startswith("skipped: dynamic KV caches")
    assert sections["vision"]["batch_1_ms"] > 0 and sections["vision"]["batch_7_ms"] > 0
    assert sections["choose"]["options"] == 4 and sections["choose"]["chosen"] in ("move_forward", "turn_left", "turn_right", "stop")
    onnx = sections["onnx"]
    assert onnx["opset_17"]["layer_norm_ops"] > 0 and onnx["opset_16"]["layer_norm_ops"] == 0  # 16 decomposes LayerNorm
    for graph in (onnx["opset_17"], onnx["opset_16"]):
        assert graph["cosine"] >= 0.99999 and graph["max_abs"] <= 1e-4
    assert onnx["fp16_graph"]["vs_torch_fp32"]["cosine"] >= 0.999
    assert sections["tensorrt"]["status"].startswith("skipped: ")
    assert sections["llamacpp"]["status"].startswith(("skipped: llama-cpp-python", "skipped: needs")), sections["llamacpp"]
    assert "no GPU backend" in sections["llamacpp"]["status"] or "does not import" in sections["llamacpp"]["status"]

    # Asked for CUDA on a machine without it: the sections that need it say so, the rest still run.
    again = run("--device", "cuda", "--size", "tiny", "--out", str(out), "--work-dir", str(work),
                "--sections", "versions", "checkpoint", "load", "decode")
    assert again.returncode == 0, again.stdout + again.stderr
    sections = json.loads(out.read_text())["sections"]
    assert sections["checkpoint"]["reused"] and sections["load"]["status"] == "skipped: no CUDA"
    assert sections["decode"]["status"] == "skipped: needs vlm, which an earlier section did not provide"


def test_a_failing_section_is_recorded_and_the_rest_run(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    args = gpu_check.parse_args(["--out", str(tmp_path / "r.json"), "--work-dir", str(tmp_path)])
    check = gpu_check.Check(args)
    check.section("broken", lambda: 1 / 0)
    check.section("fine", lambda: {"value": 1})
    check.section("late", lambda: {"value": 2}, needs=("vlm",))
    report = json.loads((tmp_path / "r.json").read_text())["sections"]
    assert report["broken"]["status"] == "error" and report["broken"]["error"] == "ZeroDivisionError: division by zero"
    assert report["fine"] == {"status": "ok", "value": 1, "seconds": report["fine"]["seconds"]}
    assert report["late"]["status"].startswith("skipped: needs vlm")
    args.budget_s = 0
    check.section("over", lambda: {"value": 3})
    assert json.loads((tmp_path / "r.json").read_text())["sections"]["over"]["status"].startswith("skipped: the time budget")
