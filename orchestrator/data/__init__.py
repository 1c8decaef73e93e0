"""FineWeb shards: the format, the sources (directory, http(s), hf, s3, synthetic), staging, verification, prepare.

`from orchestrator.data import stage_shards` is the node runner's and the CLI's entry point; the heavier
modules load on first use so that importing DataError stays cheap.
"""
from orchestrator.data.shards import DataError

__all__ = ["DataError", "StageResult", "stage_shards", "prepare_shards", "verify_dir"]


def __getattr__(name: str):
    if name in ("StageResult", "stage_shards"):
        from orchestrator.data import stage

        return getattr(stage, name)
    if name in ("prepare_shards", "verify_dir"):
        from orchestrator.data import prepare

        return getattr(prepare, name)
    raise AttributeError(name)
