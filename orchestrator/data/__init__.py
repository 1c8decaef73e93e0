"""FineWeb shards: the format, the sources (directory, http(s), hf, s3, synthetic), staging, verification, prepare."""
from orchestrator.data.shards import DataError

__all__ = ["DataError"]
