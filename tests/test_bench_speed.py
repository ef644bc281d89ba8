"""bench/speed.py's pure parts: the CPU line read from /proc/cpuinfo, and the medians, ranges and ratios of
``--repeat`` rounds as the tables print them."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import ROOT, assert_refused, call_main

sys.path.insert(0, str(ROOT / "bench"))
import speed  # noqa: E402


def _cpuinfo(vendor: str, model: str, flags: str, processors: int = 2) -> str:
    """/proc/cpuinfo's text: ``processors`` entries alike, separated by blank lines."""
    entry = (f"processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: 25\nmodel name\t: {model}\n"
             f"flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 {flags}\nbogomips\t: 4800.00\n")
    return "\n".join(entry.format(i) for i in range(processors))


ZEN4 = _cpuinfo("AuthenticAMD", "AMD EPYC 9B14", "avx avx2 fma avx512f avx512dq avx512bw avx512_bf16 avx512_vnni")
SAPPHIRE_RAPIDS = _cpuinfo("GenuineIntel", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
                           "avx avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8")
ZEN3 = _cpuinfo("AuthenticAMD", "AMD EPYC 7B13", "avx avx2 fma vaes")


@pytest.mark.parametrize("cpuinfo, features", [
    (ZEN4, "AVX2 AVX512 AVX512-BF16, no AMX"),
    (SAPPHIRE_RAPIDS, "AVX2 AVX512 AVX512-BF16 AMX"),
    (ZEN3, "AVX2, no AVX512 AVX512-BF16 AMX"),
    (_cpuinfo("ARM", "", "fp asimd", 1), "no AVX2 AVX512 AVX512-BF16 AMX"),
])
def test_cpu_features_from_the_flags(cpuinfo, features):
    assert speed.cpu_features(speed.read_cpuinfo(cpuinfo)) == features


def test_read_cpuinfo_takes_the_first_processor():
    fields = speed.read_cpuinfo(ZEN4)
    assert fields["processor"] == "0"
    assert fields["model name"] == "AMD EPYC 9B14"
    assert "avx512_bf16" in fields["flags"].split()


def test_describe_cpu():
    assert speed.describe_cpu(ZEN4, 2, "AVX512") == (
        "cpu: AMD EPYC 9B14 (2 usable cores); features: AVX2 AVX512 AVX512-BF16, no AMX; torch capability AVX512"
    )
    intel = speed.describe_cpu(SAPPHIRE_RAPIDS, 1, None)
    assert intel.startswith("cpu: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (1 usable core); features: AVX2")
    assert intel.endswith("; torch capability unknown")
    assert "features: unknown (no /proc/cpuinfo)" in speed.describe_cpu(None, 4, "DEFAULT")


def test_spread_is_median_min_max():
    assert speed.spread([3.0, 1.0, 2.0]) == speed.Spread(2.0, 1.0, 3.0)
    assert speed.spread([4.0, 1.0, 2.0, 10.0]) == speed.Spread(3.0, 1.0, 10.0)
    assert speed.spread([5.0]) == speed.Spread(5.0, 5.0, 5.0)


def test_ratios_come_from_each_round():
    # The machine slows down by half over three rounds; each round's ratio is 0.9 throughout.
    ceiling, suite = [100.0, 75.0, 50.0], [90.0, 67.5, 45.0]
    assert speed.round_ratios(suite, ceiling) == pytest.approx(speed.Spread(0.9, 0.9, 0.9))
    # Rounds paired with each other, not medians divided: here the medians' ratio would be 1.0.
    assert speed.round_ratios([10.0, 30.0, 20.0], [20.0, 30.0, 10.0]) == speed.Spread(1.0, 0.5, 2.0)
    with pytest.raises(ValueError):
        speed.round_ratios([1.0, 2.0], [1.0])


def _result(*rates: float) -> speed.Result:
    r = speed.Result(rss_mb=100.0)
    for rate in rates:
        r.add(64, 64 / rate)
    return r


def test_one_round_prints_as_before(capsys):
    speed.print_summary("train", [{"ceiling": _result(10, 30), "suite": _result(10, 27), "reference": _result(5, 12)}])
    assert capsys.readouterr().out == (
        "train     ceiling 30.0 img/s   suite 27.0 img/s   reference 12.0 img/s   suite/ceiling 0.90   "
        "suite/reference 2.2x\n"
    )


def test_several_rounds_print_medians_and_ranges(capsys):
    rounds = [
        {"ceiling": _result(10, 30), "suite": _result(10, 27), "reference": _result(5, 12)},
        {"ceiling": _result(10, 20), "suite": _result(10, 19), "reference": _result(5, 10)},
        {"ceiling": _result(10, 40), "suite": _result(10, 32), "reference": _result(5, 16)},
    ]
    speed.print_summary("train", rounds)
    assert capsys.readouterr().out == (
        "train     ceiling 30.0 img/s (20.0..40.0)   suite 27.0 img/s (19.0..32.0)   reference 12.0 img/s "
        "(10.0..16.0)   suite/ceiling 0.90 (0.80..0.95)   suite/reference 2.0x (1.9..2.2x)\n"
    )
    speed.print_table("train", rounds)
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["train", "ceiling", "10.0", "30.0", "20.0..40.0", "100"]


def test_repeat_must_be_positive(capsys):
    assert_refused(call_main(speed.main, capsys, "--repeat", "0"), "--repeat")


def test_engines_line_on_real_images(tiny_data, capsys):
    """``--engines``: one line with the four engines' throughput and onnxruntime's ratios, from a real run."""
    proc = call_main(speed.main, capsys, "--model", "test_resnet", "--size", "32", "--images", "16", "--batch_size",
                     "8", "--epochs", "2", "--num_workers", "0", "--device", "cpu", "--data", tiny_data, "--engines",
                     check=True)
    line = next(row for row in proc.stdout.splitlines() if row.startswith("engines "))
    assert re.fullmatch(r"engines   eager [\d.]+ img/s   eager fp32 [\d.]+ img/s   compiled fp32 [\d.]+ img/s   "
                        r"onnxruntime fp32 [\d.]+ img/s   onnxruntime/eager fp32 [\d.]+x   onnxruntime/compiled "
                        r"[\d.]+x", line), line
    assert_refused(call_main(speed.main, capsys, "--engines", "--device", "cuda"),
                   "--engines compares engines on the CPU")
