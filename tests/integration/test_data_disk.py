"""A full disk: a 4 MiB tmpfs as the destination (needs root to mount; skipped otherwise)."""
import shutil
import subprocess

import pytest

import orchestrator.data.stage as stage_mod
from orchestrator.data import DataError, stage_shards

pytestmark = pytest.mark.integration
SYN = "synthetic://markov?seed=5&states=64&branch=4&doc_len=32&train_shards=3&shard_tokens=1000000"  # 3 x 2 MB


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine, so no small tmpfs to fill")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a 4 MiB tmpfs is not permitted here ({r.stderr.strip() or r.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_not_enough_space_is_refused_before_the_first_byte(small_disk):
    with pytest.raises(DataError, match=r"not enough free disk space: 4 shards need 8\.0 MB but 4\.\d MB are free"):
        stage_shards(SYN, small_disk / "d", progress=False)
    assert not (small_disk / "d").exists()


@pytest.mark.parametrize("from_directory", [True, False])
def test_a_disk_that_fills_during_the_stage_names_the_shard(small_disk, tmp_path, monkeypatch, from_directory):
    # another writer takes the space after the check passed: the stage must fail cleanly, not half-write
    source = SYN
    if from_directory:
        source = str(tmp_path / "src")
        stage_shards(SYN, source, progress=False)
    monkeypatch.setattr(stage_mod, "_check_free_space", lambda dest, remotes: None)
    with pytest.raises(DataError, match=r"fineweb_\w+_\d{6}\.bin: the disk under .* is full"):
        stage_shards(source, small_disk / "d", progress=False)
    left = list((small_disk / "d").iterdir())
    assert all(p.stat().st_size == 1024 + 2_000_000 for p in left if p.name.startswith("fineweb_"))
    assert not [p for p in left if p.name.endswith(".partial")]
