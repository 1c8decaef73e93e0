"""Report plots are real PNGs with content, and the upload puts them beside the sweep, manifest last."""
from __future__ import annotations

import json
from pathlib import Path

from orchestrator.artifacts import read_manifest, verify_manifest
from orchestrator.report import make_plots, write_report
from orchestrator.log_files import runs_from_logs
from orchestrator.store import open_store

LOGS = Path(__file__).resolve().parents[1] / "data" / "logs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP = "smoke-20261125T090000Z-abc123"


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 10_000, f"{path.name} is only {len(data)} bytes: an empty plot?"


def test_plots_from_logs_including_a_failed_one(tmp_path):
    runs = runs_from_logs([LOGS / "modded_record.txt", LOGS / "modded_2024.txt", LOGS / "modded_truncated.txt"])
    files = make_plots(runs, tmp_path / "plots")
    assert [f.name for f in files] == ["val_loss_vs_step.png", "val_loss_vs_time.png", "train_time_distribution.png"]
    for f in files:
        assert_png(f)


def test_plots_with_no_complete_seed_still_render(tmp_path):
    for f in make_plots(runs_from_logs([LOGS / "ours_oom.txt"]), tmp_path):
        assert f.read_bytes()[:8] == PNG_MAGIC


def test_write_report_uploads_plots_and_manifest_last(tmp_path):
    store = open_store(str(tmp_path / "store"))
    for seed, name in enumerate(["ours_complete.txt", "modded_record.txt", "ours_oom.txt"]):
        store.put_bytes((LOGS / name).read_bytes(), f"{SWEEP}/seed-{seed}/train.log")
        store.put_bytes(b'{"state": "succeeded"}', f"{SWEEP}/seed-{seed}/manifest.json")
    manifest = write_report(store, SWEEP, tmp_path / "out")
    assert read_manifest(store, f"{SWEEP}/report") == manifest
    assert {f.key for f in manifest.files} == {
        "val_loss_vs_step.png", "val_loss_vs_time.png", "train_time_distribution.png", "stats.json"}
    assert verify_manifest(store, manifest) == []  # every object there, with the size and sha256 listed
    stats = json.loads(store.get_bytes(f"{SWEEP}/report/stats.json"))
    assert stats["n_complete"] == 2 and stats["failed"] == ["seed-2"]


def test_report_manifest_is_written_after_every_plot(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.put_bytes((LOGS / "ours_complete.txt").read_bytes(), f"{SWEEP}/seed-0/train.log")
    written = []

    class Recording:  # the real store, with the order of writes noted
        def __getattr__(self, name):
            return getattr(store, name)

        def put_file(self, path, key, sha256=None):
            written.append(key)
            return store.put_file(path, key, sha256=sha256)

        def put_bytes(self, data, key):
            written.append(key)
            return store.put_bytes(data, key)

    write_report(Recording(), SWEEP, tmp_path / "out")
    assert written[-1] == f"{SWEEP}/report/manifest.json" and len(written) == 5
