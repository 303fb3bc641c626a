"""`mobilevlm bench` end to end at a tiny size: the random checkpoint, the GGUF (and mmproj) builds and the timed
pipelines, each in its own process, then the tables, the JSON and the plot."""

import ctypes
import json

import pytest
from PIL import Image

from mobilevlm_ros.bench import BenchOptions, BenchResult
from mobilevlm_ros.bench.harness import Worker
from mobilevlm_ros.bench.llamacpp_mtmd import common_prefix
from mobilevlm_ros.bench.plot import plot, stage_seconds
from mobilevlm_ros.bench.report import markdown, ratios
from mobilevlm_ros.cli import main
from mobilevlm_ros.cpu import RELEVANT_FLAGS, cpu_info


def test_tiny_bench_runs_every_pipeline(tmp_path, capsys):
    args = ["bench", "--size", "tiny", "--language", "llamacpp", "--quant", "q8_0", "--vs", "reference", "--vs", "llamacpp-plain",
            "--new-tokens", "4", "--repeats", "1", "--work-dir", str(tmp_path), "--json", str(tmp_path / "bench.json"),
            "--markdown", str(tmp_path / "bench.md")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "bench.md").read_text()
    result = json.loads((tmp_path / "bench.json").read_text())
    ours, plain, reference = result["pipelines"]
    assert (ours, plain, reference) == ("ours (llamacpp q8_0)", "llama-cpp-python plain (q8_0)", "reference (transformers)")
    pipelines = result["pipelines"]
    for name in (ours, reference):
        assert pipelines[name]["generated_tokens"] == 4  # EOS suppressed: equal work everywhere
        assert pipelines[name]["vision_ms"] > 0 and pipelines[name]["second_ttft_s"] > 0
    assert pipelines[plain]["generated_tokens"] == 4
    assert pipelines[plain]["prompt_tokens"] == pipelines[ours]["prompt_tokens"] == pipelines[reference]["prompt_tokens"] > 144
    assert all(pipelines[name]["peak_rss_mb"] > 100 and pipelines[name]["decode_tok_s"] > 0 for name in pipelines)
    assert set(result["ratios"]) == {"second-question TTFT / first", "peak RSS (GB)", "image -> answer speed-up vs reference",
                                     "decode tok/s vs llama-cpp-python plain"}
    assert result["gguf"]["built_now"] and "Q8_0" in result["gguf"]["tensor_types"]
    assert "| decode (tok/s) |" in printed and "| image -> answer speed-up vs reference |" in printed
    assert (tmp_path / "tiny-random-v1" / "tokenizer.model").is_file()
    cpu = cpu_info()
    assert result["machine"]["cpu"] == cpu.model and result["machine"]["cpu_flags"] == [f for f in RELEVANT_FLAGS if f in cpu.flags]
    assert f"CPU: {cpu.model}, {cpu.cpus} CPUs" in printed
    for name in (ours, plain):  # where llama.cpp put the weights (CPU, or CPU_Mapped for llama-cpp-python's mmap)
        assert pipelines[name]["llama_cpp_buffers"] and "AMX" not in pipelines[name]["llama_cpp_buffers"]
        assert f"llama.cpp weights, {name}: " in printed


def test_ratios_and_table_from_measurements():
    pipelines = {
        "ours": {"answer_s": 2.0, "ttft_s": 1.0, "second_ttft_s": 0.1, "decode_tok_s": 19.0, "peak_rss_mb": 2000.0},
        "reference (transformers)": {"answer_s": 7.0, "ttft_s": 3.0, "second_ttft_s": 2.0, "decode_tok_s": 3.0, "peak_rss_mb": 8000.0},
        "llama-cpp-python plain (q4_k_s)": {"answer_s": 1.0, "ttft_s": 0.5, "decode_tok_s": 20.0, "peak_rss_mb": 900.0},
    }
    found = ratios(pipelines, "ours")
    assert found["image -> answer speed-up vs reference"] == {"value": 3.5, "target": ">= 3", "met": True}
    assert found["decode tok/s vs llama-cpp-python plain"]["value"] == pytest.approx(0.95)
    assert found["second-question TTFT / first"]["met"] and found["peak RSS (GB)"]["met"]
    table = markdown(BenchResult(BenchOptions(), {"cpu": "test cpu", "cpus": 2}, "model", None, pipelines, found))
    assert "| image -> answer (s) | 2.00 | 7.00 | 1.00 |" in table  # columns in the order given
    assert "| 2nd question TTFT, same frame (s) | 0.100 | 2.000 | - |" in table


MTMD_RATIOS = {
    "image -> answer vs llama.cpp mtmd", "time to first token vs llama.cpp mtmd",
    "2nd question TTFT vs llama.cpp mtmd, new conversation", "2nd question TTFT vs llama.cpp mtmd with llama-server's prompt cache",
    "decode tok/s vs llama.cpp mtmd", "vision + projector ms vs llama.cpp mtmd's encode",
}


def test_tiny_bench_against_llamacpp_mtmd_with_a_plot(tmp_path, capsys):
    """llama.cpp's own image pipeline on the tiny random checkpoint: its mmproj is written from it (24x24 patch grid,
    as clip's LDP graphs need), mtmd answers with exactly as many tokens as ours, and the plot is a PNG."""
    args = ["bench", "--size", "tiny", "--language", "llamacpp", "--quant", "q8_0", "--vs", "llamacpp-mtmd",
            "--new-tokens", "4", "--repeats", "1", "--work-dir", str(tmp_path), "--json", str(tmp_path / "bench.json"),
            "--markdown", str(tmp_path / "bench.md"), "--plot", str(tmp_path / "bench.png")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    ours, mtmd = result["pipelines"]
    assert (ours, mtmd) == ("ours (llamacpp q8_0)", "llama.cpp mtmd (q8_0, f16 mmproj)")
    figures = result["pipelines"][mtmd]
    for key in ("preprocess_ms", "vision_ms", "prefill_tok_s", "ttft_s", "decode_tok_s", "answer_s", "second_ttft_s",
                "second_ttft_cached_s", "peak_rss_mb", "load_s", "vision_threads"):
        assert figures[key] > 0, key
    assert figures["generated_tokens"] == result["pipelines"][ours]["generated_tokens"] == 4
    # mtmd's tokenization of the v1 prompt around its image marker gives our prompt's length: equal work
    assert figures["prompt_tokens"] == result["pipelines"][ours]["prompt_tokens"] > 144
    # llama-server's cache keeps the system prompt, the image and the common start of the question
    assert 144 < figures["cached_prefix_tokens"] < figures["prompt_tokens"]
    assert figures["llama_cpp_buffers"] and "AMX" not in figures["llama_cpp_buffers"]
    mmproj = result["mmproj"]
    assert mmproj["built_now"] and mmproj["file_type"] == "f16" and mmproj["cls_layout"] == "dropped"
    assert figures["mmproj"] == (tmp_path / "engines" / mmproj["path"].rsplit("/", 1)[1]).name
    assert MTMD_RATIOS <= set(result["ratios"])
    assert result["ratios"]["vision + projector ms vs llama.cpp mtmd's encode"]["met"] is None
    for name in MTMD_RATIOS:
        assert f"| {name} | " in printed
    assert "| 2nd question TTFT, same frame, llama-server's prompt cache (s) | - | " in printed
    assert f"mmproj: {mmproj['path'].rsplit('/', 1)[1]}, f16" in printed
    assert result["machine"]["date"] in printed
    assert result["machine"]["load_average"]["samples"] >= 1 and "load average while timing: mean " in printed
    with Image.open(tmp_path / "bench.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] >= 800
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_report_only_ratios_and_the_plot_from_measurements(tmp_path):
    ours = {"preprocess_ms": 10.0, "vision_ms": 300.0, "ttft_s": 1.0, "answer_s": 4.0, "second_ttft_s": 0.2,
            "decode_tok_s": 20.0, "peak_rss_mb": 2000.0}
    mtmd = {"preprocess_ms": 20.0, "vision_ms": 600.0, "ttft_s": 4.0, "answer_s": 7.0, "second_ttft_s": 4.0,
            "second_ttft_cached_s": 0.25, "decode_tok_s": 20.0, "peak_rss_mb": 1500.0}
    pipelines = {"ours": ours, "llama.cpp mtmd (q4_k_s, f16 mmproj)": mtmd, "torch eager vision (float32)": {"vision_ms": 900.0}}
    found = ratios(pipelines, "ours")
    assert found["2nd question TTFT vs llama.cpp mtmd, new conversation"] == {"value": 0.05, "target": "<= 0.05", "met": True}
    assert found["time to first token vs llama.cpp mtmd"]["value"] == 0.25 and found["time to first token vs llama.cpp mtmd"]["met"]
    assert found["image -> answer vs llama.cpp mtmd"]["value"] == pytest.approx(4 / 7) and found["image -> answer vs llama.cpp mtmd"]["met"]
    assert found["decode tok/s vs llama.cpp mtmd"] == {"value": 1.0, "target": ">= 0.98", "met": True}
    assert found["2nd question TTFT vs llama.cpp mtmd with llama-server's prompt cache"] == {"value": 0.8, "target": "-", "met": None}
    table = markdown(BenchResult(BenchOptions(), {"cpu": "test cpu", "cpus": 2, "date": "2026-11-29"}, "model", None, pipelines, found))
    assert "| vision + projector ms vs llama.cpp mtmd's encode | 0.500 | - | - |" in table
    assert "CPU: test cpu, 2 CPUs (? cores); no AVX2/AVX-512/AMX, 2026-11-29" in table
    assert stage_seconds(ours) == pytest.approx({"preprocess": 0.01, "vision": 0.3, "prefill": 0.69, "decode": 3.0})
    assert stage_seconds({"vision_ms": 900.0}) == {"preprocess": 0.0, "vision": 0.9, "prefill": 0.0, "decode": 0.0}
    result = BenchResult(BenchOptions(), {"cpu": "test cpu", "cpus": 2, "date": "2026-11-29"}, "model", None, pipelines, found)
    with Image.open(plot(result, tmp_path / "chart.png")) as image:
        assert image.format == "PNG"


def test_llama_server_prompt_cache_prefix():
    """Text token by token, an image only whole and only when its id and size match, never one without an id."""
    first = [("text", [1, 5, 6], 3), ("image", (b"frame", 144), 144), ("text", [7, 8, 9], 3)]
    assert common_prefix(first, [("text", [1, 5, 6], 3), ("image", (b"frame", 144), 144), ("text", [7, 4], 2)]) == 3 + 144 + 1
    assert common_prefix(first, [("text", [1, 5, 6], 3), ("image", (b"other", 144), 144), ("text", [7, 8, 9], 3)]) == 3
    assert common_prefix(first, [("text", [1, 5, 2], 3), ("image", (b"frame", 144), 144)]) == 2
    anonymous = [("text", [1], 1), ("image", (None, 144), 144)]
    assert common_prefix(anonymous, anonymous) == 1


def test_bench_refuses_too_few_tokens():
    with pytest.raises(SystemExit):
        main(["bench", "--size", "huge"])
    assert main(["bench", "--size", "tiny", "--new-tokens", "1"]) == 1


def test_tiles_adds_the_cost_of_tiles_mode(tmp_path):
    """`--tiles 4` on the 1920x1080 frame: a 3x1 grid (MiniCPM-V's choice at 336 with a budget of 4), so the vision
    batch is overview + 3 tiles and the prompt holds 3 more images than the single view."""
    args = ["bench", "--size", "tiny", "--language", "torch", "--tiles", "4", "--new-tokens", "2", "--repeats", "1",
            "--work-dir", str(tmp_path), "--json", str(tmp_path / "bench.json"), "--markdown", str(tmp_path / "bench.md")]
    assert main(args) == 0
    (ours,) = json.loads((tmp_path / "bench.json").read_text())["pipelines"].values()
    assert ours["tiles"] == 3
    assert ours["tiles_prompt_tokens"] >= ours["prompt_tokens"] + 3 * 144
    assert ours["tiles_vision_ms"] > 0 and ours["tiles_ttft_s"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "| tiles mode: tiles of a 1920x1080 frame | 3 |" in table and "| tiles mode: time to first token (s) |" in table
    assert main(args[:-4] + ["--tiles", "-1"]) == 1


def crash_on_setup() -> None:
    ctypes.string_at(0)  # SIGSEGV, as llama.cpp's AMX matmul did


def test_a_pipeline_process_that_dies_is_named_with_its_signal():
    with pytest.raises(RuntimeError, match=r"process died \(signal SIGSEGV\) before it answered"):
        Worker(crash_on_setup)
