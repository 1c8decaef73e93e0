"""The fake record's sibling module: what a record's triton_kernels.py is to its train_gpt.py."""
import numpy as np

VOCAB = 50257


def read_shard(path: str) -> np.ndarray:
    """A FineWeb shard: 256 int32 header (magic 20240520, version 1, token count), then uint16 tokens."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520 and header[1] == 1, f"{path}: not a shard"
    return np.fromfile(path, dtype=np.uint16, count=int(header[2]), offset=256 * 4)


def unigram_loss(counts: np.ndarray, tokens: np.ndarray) -> float:
    """Mean cross-entropy of tokens under add-one-smoothed unigram counts, in nats."""
    p = (counts + 1.0) / (counts.sum() + VOCAB)
    return float(-np.log(p[tokens]).mean())


def hub_kernel(repo: str) -> str:
    """The first line of a hub kernel's module, found as kernels.get_kernel finds it: snapshot_download."""
    from pathlib import Path

    from huggingface_hub import snapshot_download

    modules = sorted(Path(snapshot_download(repo)).glob("build/*/*/__init__.py"))
    assert modules, f"{repo}: no build/<variant>/<name>/__init__.py in the hub cache"
    return modules[0].read_text().splitlines()[0]
