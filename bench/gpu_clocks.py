"""The GPU's SM clock, power draw and temperature while a benchmark runs, sampled by nvidia-smi's own loop
(`--loop-ms`) in a child process that is stopped by its PID.

Why: the H100 and H200 run the trainer at their power cap, where the SM clock follows the load, and the same
code measured 589.1 and 594.0 ms/step in two calls on two H200s. A step time with the clock it ran at can be
compared across runs; one without cannot. nvidia-smi ships with the driver on every GPU machine, where NVML's
Python binding would be one more wheel to carry to a machine without a package registry.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

FIELDS = "uuid,clocks.sm,power.draw,temperature.gpu"


def parse(text: str, uuid: str | None = None) -> dict | None:
    """nvidia-smi's `--format=csv,noheader,nounits` lines of FIELDS -> means and extremes for one GPU: the one
    whose UUID ends with `uuid`, or the only one sampled (a machine of one GPU, or a UUID torch spells another
    way). Lines with a field it could not read ('[N/A]', '[Not Supported]') or cut off by the stop are skipped.
    None without samples, or with several GPUs and none of them `uuid`."""
    by_gpu: dict[str, list[tuple[float, ...]]] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            by_gpu.setdefault(parts[0].lower(), []).append(tuple(float(p) for p in parts[1:]))
        except ValueError:
            continue
    ours = [k for k in by_gpu if uuid and k.endswith(uuid.lower())] or (list(by_gpu) if len(by_gpu) == 1 else [])
    if not ours:
        return None
    mhz, watts, temp = zip(*by_gpu[ours[0]])
    return dict(samples=len(mhz), sm_mhz_mean=statistics.fmean(mhz), sm_mhz_min=min(mhz), sm_mhz_max=max(mhz),
                power_w_mean=statistics.fmean(watts), power_w_max=max(watts), temp_c_max=max(temp))


class ClockSampler:
    """`with ClockSampler(uuid) as s: ...` then `s.summary` (parse's dict, or None where nvidia-smi is missing or
    printed nothing in time). nvidia-smi samples every GPU and parse keeps the rows of `uuid` (torch's UUID of
    its device), so the figures are of the GPU torch uses whatever CUDA_VISIBLE_DEVICES says."""

    def __init__(self, uuid: str | None, interval_ms: int = 100, nvidia_smi: str = "nvidia-smi"):
        self.uuid, self.interval_ms, self.exe = uuid, interval_ms, shutil.which(nvidia_smi)
        self.summary: dict | None = None
        self._proc: subprocess.Popen | None = None
        self._log: Path | None = None

    def __enter__(self) -> ClockSampler:
        if self.exe is None:
            return self
        self._log = Path(tempfile.mkdtemp(prefix="gpu-clocks-")) / "samples.csv"
        cmd = [self.exe, f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}"]
        with self._log.open("w") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self.summary = parse(self._log.read_text(), self.uuid)
        shutil.rmtree(self._log.parent, ignore_errors=True)


def gpu_uuid(torch) -> str | None:
    """The current CUDA device's UUID (nvidia-smi prints it with a 'GPU-' prefix), or None where torch does not
    report one."""
    uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
    return str(uuid) if uuid is not None else None
