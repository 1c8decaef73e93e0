"""bench/gpu_clocks.py: reading nvidia-smi's samples, and the sampler's child process (a stand-in nvidia-smi
script, since this machine has no GPU): started with the query, stopped by its PID, its rows kept."""
import os
import stat
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from gpu_clocks import FIELDS, ClockSampler, parse  # noqa: E402

TWO_GPUS = """GPU-aaaa-1111, 1980, 650.50, 60
GPU-bbbb-2222, 1755, 700.00, 71
GPU-aaaa-1111, 1830, 699.50, 62
GPU-bbbb-2222, [N/A], 700.00, 72
GPU-aaaa-1111, 1785, 6"""


def test_parse_keeps_the_rows_of_our_gpu_and_skips_unreadable_ones():
    got = parse(TWO_GPUS, "aaaa-1111")
    assert got["samples"] == 2   # the third row of aaaa was cut off by the stop
    assert got["sm_mhz_mean"] == (1980 + 1830) / 2 and got["sm_mhz_min"] == 1830 and got["sm_mhz_max"] == 1980
    assert got["power_w_mean"] == (650.5 + 699.5) / 2 and got["power_w_max"] == 699.5 and got["temp_c_max"] == 62
    other = parse(TWO_GPUS, "BBBB-2222")   # the [N/A] row skipped; UUIDs compare without case
    assert other["samples"] == 1 and other["sm_mhz_mean"] == 1755


def test_parse_falls_back_to_the_only_gpu_and_refuses_to_guess_among_several():
    one = "GPU-cccc, 1410, 400, 50\nGPU-cccc, 1410, 410, 51\n"
    assert parse(one, "spelled-another-way")["samples"] == 2
    assert parse(TWO_GPUS, "no-such-gpu") is None
    assert parse("", "aaaa") is None


def fake_nvidia_smi(tmp_path: Path) -> Path:
    exe = tmp_path / "nvidia-smi"
    exe.write_text(f"""#!{sys.executable}
import sys, time
open({str(tmp_path / "argv")!r}, "w").write(" ".join(sys.argv[1:]))
while True:
    print("GPU-aaaa-1111, 1980, 650.0, 60", flush=True)
    print("GPU-bbbb-2222, 1200, 100.0, 40", flush=True)
    time.sleep(0.05)
""")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_sampler_runs_the_query_and_stops_its_child(tmp_path):
    with ClockSampler("aaaa-1111", interval_ms=50, nvidia_smi=str(fake_nvidia_smi(tmp_path))) as s:
        deadline = time.monotonic() + 10
        while not (tmp_path / "argv").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        pid = s._proc.pid
    assert s._proc.returncode is not None   # stopped and reaped
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
    assert (tmp_path / "argv").read_text() == f"--query-gpu={FIELDS} --format=csv,noheader,nounits --loop-ms=50"
    assert s.summary["samples"] >= 2 and s.summary["sm_mhz_mean"] == 1980 and s.summary["power_w_max"] == 650


def test_sampler_without_nvidia_smi_gives_no_summary(tmp_path):
    with ClockSampler("aaaa", nvidia_smi=str(tmp_path / "missing")) as s:
        pass
    assert s.summary is None


def test_gpu_uuid_is_torchs_uuid_of_the_current_device_as_text():
    from types import SimpleNamespace

    from gpu_clocks import gpu_uuid

    def fake_torch(props):
        return SimpleNamespace(cuda=SimpleNamespace(current_device=lambda: 1,
                                                    get_device_properties=lambda i: props[i]))

    props = [SimpleNamespace(uuid="wrong"), SimpleNamespace(uuid="aaaa-1111")]
    assert gpu_uuid(fake_torch(props)) == "aaaa-1111"
    assert gpu_uuid(fake_torch([None, SimpleNamespace()])) is None   # a torch without the attribute
