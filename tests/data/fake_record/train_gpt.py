"""A stand-in for a modded-nanogpt record script: run by torchrun from its own folder, it imports a sibling
module, reads data/fineweb10B/*.bin under DATA_PATH, writes logs/<run_id>.txt with run_id final/<uuid>
(so logs/final/ must exist, as in the published records) and prints the records' log lines. Its "model"
is a unigram count over a random sample of the train tokens; numpy only, so it runs on any CPU.
`--hub-kernel OWNER/NAME` loads that repo from the Hugging Face hub cache the way kernels.get_kernel does
(HF_HUB_OFFLINE=1 on an offline node: the cache must hold it). `--hang-after-step N` prints its pid and sleeps
after step N, as a hung NCCL collective would leave a record."""
import glob
import os
import sys
import time
import uuid

import numpy as np

from fake_kernels import VOCAB, read_shard, unigram_loss

num_iterations = 4
run_id = f"final/{uuid.uuid4()}"
data_path = os.environ.get("DATA_PATH", ".")
train_files = sorted(glob.glob(os.path.join(data_path, "data/fineweb10B/fineweb_train_*.bin")))
val_files = sorted(glob.glob(os.path.join(data_path, "data/fineweb10B/fineweb_val_*.bin")))
assert train_files and val_files, f"no shards under {data_path}/data/fineweb10B"
master = int(os.environ["RANK"]) == 0

os.makedirs("logs", exist_ok=True)
logfile = f"logs/{run_id}.txt"


def print0(s: str) -> None:
    if master:
        with open(logfile, "a") as f:
            print(s)
            print(s, file=f)


train = np.concatenate([read_shard(f) for f in train_files])
val = read_shard(val_files[0])[:65536]
rng = np.random.default_rng()
counts = np.zeros(VOCAB)
t0 = time.perf_counter()
if "--hub-kernel" in sys.argv:
    from fake_kernels import hub_kernel

    print0(f"hub kernel: {hub_kernel(sys.argv[sys.argv.index('--hub-kernel') + 1])}")
print0(f"step:0/{num_iterations} val_loss:{unigram_loss(counts, val):.4f} train_time:0ms step_avg:nanms")
for step in range(1, num_iterations + 1):
    counts += np.bincount(train[rng.integers(0, len(train), 4096)], minlength=VOCAB)
    ms = 1000 * (time.perf_counter() - t0)
    if step == num_iterations:
        print0(f"step:{step}/{num_iterations} val_loss:{unigram_loss(counts, val):.4f} train_time:{ms:.0f}ms "
               f"step_avg:{ms / step:.2f}ms")
    else:
        print0(f"step:{step}/{num_iterations} train_time:{ms:.0f}ms step_avg:{ms / step:.2f}ms")
    if "--hang-after-step" in sys.argv and step == int(sys.argv[sys.argv.index("--hang-after-step") + 1]):
        print0(f"hanging after step {step}, pid {os.getpid()}")
        time.sleep(3600)
print0("peak memory allocated: 0 MiB reserved: 0 MiB")
