"""`mobilevlm bench` end to end at a tiny size: the random checkpoint, the GGUF build and all three timed pipelines,
each in its own process, then the tables and the JSON."""

import ctypes
import json

import pytest

from mobilevlm_ros.bench import BenchOptions, BenchResult
from mobilevlm_ros.bench.harness import Worker
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
