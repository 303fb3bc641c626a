"""CPU facts read from /proc/cpuinfo: the model and the features that decide llama.cpp's AMX setting and bench lines."""

from pathlib import Path

from mobilevlm_ros.cpu import cpu_info
from mobilevlm_ros.ggml import amx_allowed

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512_vnni avx512_bf16 avx512_vbmi

processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse sse2 avx avx2
"""
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_an_amd_epyc_has_avx512_but_no_amx(tmp_path: Path):
    (tmp_path / "cpuinfo").write_text(EPYC)
    cpu = cpu_info(tmp_path / "cpuinfo")
    assert cpu.model == "AMD EPYC 9R14" and not cpu.has_amx
    assert "avx512_bf16" in cpu.flags  # the first processor's block, not the last one's
    assert cpu.describe().startswith("AMD EPYC 9R14, ") and cpu.describe().endswith("; avx2 avx512f avx512_vnni avx512_bf16")


def test_a_sapphire_rapids_xeon_has_amx(tmp_path: Path):
    (tmp_path / "cpuinfo").write_text(XEON)
    cpu = cpu_info(tmp_path / "cpuinfo")
    assert cpu.has_amx
    assert cpu.describe().endswith("; avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16")


def test_no_cpuinfo_means_no_features(tmp_path: Path):
    cpu = cpu_info(tmp_path / "missing")
    assert cpu.flags == frozenset() and not cpu.has_amx and cpu.cpus >= 1


def test_llama_cpp_leaves_amx_out_only_where_the_cpu_has_it(tmp_path: Path):
    """llama.cpp's AMX matmul crashes on some Intel CPUs with AMX: by default it is off there; elsewhere there is no
    AMX buffer type, so allowing it changes nothing. An explicit setting wins on both."""
    (tmp_path / "epyc").write_text(EPYC)
    (tmp_path / "xeon").write_text(XEON)
    epyc, xeon = cpu_info(tmp_path / "epyc").flags, cpu_info(tmp_path / "xeon").flags
    assert amx_allowed(epyc) and not amx_allowed(xeon)
    assert amx_allowed(xeon, amx=True) and not amx_allowed(epyc, amx=False)
