"""Training: untimed warm-up, the timed loop, validation, record log lines, checkpoints, preemption.

Rank 0 prints the record's log lines to stdout and writes OUT/metrics.jsonl and OUT/trainer_timings.json.
Validation and checkpointing are not counted in train_time, as in the record.
"""
from __future__ import annotations

import ctypes
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainer import attention as attn_impl
from trainer import checkpoint, trace_cache
from trainer.config import TrainConfig
from trainer.cuda_graphs import OwnedGradients, compile_model, cuda_graph_skips
from trainer.data import BOS, TrainBatches, find_shards, one_chunk_per_shape, validation_chunks
from trainer.distributed import GradientReducer, Ranks, all_sum, any_rank, barrier, init_ranks, sum_to_host
from trainer.exit_codes import EXIT_PREEMPTED as PREEMPTED_EXIT
from trainer.layers import Rotary
from trainer.model import GPT
from trainer.optim import build_optimizers, copy_adam_state
from trainer.schedules import (adam_steps, doc_len_cap, head_tied, loss_weights, lr_scale, micro_batch_len,
                                microbatches, muon_momentum, val_window_blocks, warmup_steps, window_blocks,
                                window_changes, yarn_scales)
from trainer.startup import BEFORE_WARMUP, compile_cache_counts, compile_phases
from trainer.vocab import gpt2_ranks, prefix_table

log = logging.getLogger("trainer")


def keep_freed_memory() -> None:
    """CPU runs free and re-fault ~200 MB of logits every micro-batch; keeping freed memory in the heap
    (glibc mallopt: no mmap for big blocks, no trim) halves the CPU time per step. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class Trainer:
    def __init__(self, cfg: TrainConfig, data_dir: str, out_dir: str, ranks: Ranks | None = None,
                 startup: dict[str, float] | None = None):
        self.cfg = cfg.validate()
        t0 = time.time()
        # where start-up time goes: BEFORE_WARMUP's parts, then the warm-up's (its first step is the compile)
        self.warmup_parts: dict[str, float] = dict(startup or {})
        self.out = Path(out_dir)
        self.ranks = ranks or init_ranks(cfg.device)
        r = self.ranks
        if cfg.grad_accum_total % r.world:
            raise ValueError(f"grad_accum_total={cfg.grad_accum_total} is not divisible by {r.world} ranks")
        uneven = [count for _, count in cfg.batch_phases() if count % r.world]
        if uneven:
            raise ValueError(f"batch_schedule: a phase of {uneven[0]} micro-batches does not split over {r.world} "
                             f"ranks; give every phase a multiple of {r.world} micro-batches")
        # the data first: a missing or malformed shard fails before any model is built
        self.batches = TrainBatches(find_shards(data_dir, cfg.train_files), cfg.seq_len, r.rank, r.world,
                                    cfg.grad_accum_total)
        self.val = validation_chunks(find_shards(data_dir, cfg.val_files), cfg.val_tokens, cfg.val_seq_len,
                                     r.rank, r.world)
        self.cuda = r.device.type == "cuda"
        self.warmup_parts["ranks_and_data_s"] = time.time() - t0
        if not self.cuda:
            keep_freed_memory()
        torch.manual_seed(cfg.seed)
        prefixes = prefix_table(gpt2_ranks(cfg.vocab_file), cfg.vocab_size) if cfg.prefix_token_loss else None
        with torch.device(r.device):   # initialised where it trains: no 200M-parameter init on the host first
            self.model = GPT(cfg)
        if prefixes is not None:
            self.model.prefix_table.copy_(torch.from_numpy(prefixes))
        self.model.act_dtype = torch.bfloat16 if self.cuda else torch.float32
        self.model.attention = attn_impl.implementation(cfg.attention, self.cuda)
        fp8_capable = self.cuda and torch.cuda.get_device_capability(r.device) >= (9, 0)
        self.model.fp8_head = bool(cfg.fp8_head and fp8_capable)
        self.model.fused_head_loss = cfg.fused_head_loss and self.cuda
        if fp8_capable:
            for block in self.model.blocks:
                if block.mlp is not None:
                    block.mlp.fp8 = cfg.mlp_fp8
                if block.attn is not None:
                    block.attn.fp8 = cfg.qkv_fp8
        self.sync()
        self.warmup_parts["model_s"] = time.time() - t0 - self.warmup_parts["ranks_and_data_s"]
        self.compiled = cfg.compile and self.cuda
        t1 = time.time()
        self.forward = compile_model(self.model, cfg) if self.compiled else self.model
        if self.compiled:   # lazy, but where the trace cache loads the model's traces
            self.warmup_parts["compile_s"] = time.time() - t1
        t1 = time.time()
        self.adam, self.muon = build_optimizers(self.model, cfg)
        adam_params = [p for g in self.adam.param_groups for p in g["params"]] if cfg.adam_every_other_step else []
        self.reducer = GradientReducer(self.model.parameters(), r.world, deferrable=adam_params)
        self.owned_grads = OwnedGradients(self.model.parameters()) if self.compiled and cfg.cuda_graphs else None
        self.stop = checkpoint.StopRequest(self.out)
        # record-31's YaRN: the window's changes over the run, and how many of them the rotary tables hold now
        self.window_changes = window_changes(cfg) if cfg.yarn else []
        self.yarn_applied = 0
        self.step = 0
        self.train_ms = 0.0
        self.stretch_mark = None   # the mark where the current stretch of train_time began (see run)
        self.timings = dict(start_unix=time.time(), warmup_s=0.0, first_step_unix=None, train_s=0.0, val_s=0.0,
                            end_unix=None, steps_done=0, total_steps=cfg.total_steps())
        self.timings["warmup_parts"] = self.warmup_parts   # the same dict: the warm-up's parts join it
        if r.is_main:
            (self.out / "ckpt").mkdir(parents=True, exist_ok=True)
        self.warmup_parts["setup_s"] = time.time() - t1   # the optimizers, the gradients' hooks, the folders

    # ------------------------------------------------------------------------ pieces of a step

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64)).to(self.ranks.device, non_blocking=True)

    def _step_tensors(self, micro_batches: list[np.ndarray], window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's tokens and window in one copy from pinned memory: the host never waits on the GPU here
        (a copy from pageable memory may), so it can queue the next micro-batch while the GPU runs this one."""
        host = torch.from_numpy(np.concatenate([np.stack(micro_batches).astype(np.int64).ravel(), [window]]))
        if self.cuda:
            host = host.pin_memory()   # from torch's caching host allocator: not reused before the copy is done
        dev = host.to(self.ranks.device, non_blocking=True)
        return dev[:-1].view(len(micro_batches), -1), dev[-1]

    def _weights(self, weights: tuple[float, ...]) -> torch.Tensor | None:
        """A step's loss weights on the device, copied from pinned memory as the tokens are; None for ()."""
        if not weights:
            return None
        host = torch.tensor(weights, dtype=torch.float32)
        return (host.pin_memory() if self.cuda else host).to(self.ranks.device, non_blocking=True)

    def set_yarn(self, step: int) -> None:
        """The rotary frequencies and attention scale of this step (yarn), set only when a window change has passed
        since the last call (or, after a resume or the warm-up, when the step went back)."""
        if not self.cfg.yarn:
            return
        passed = sum(1 for at, _, _ in self.window_changes if at <= step)
        if passed == self.yarn_applied:
            return
        rotaries = [m for m in self.model.modules() if isinstance(m, Rotary)]
        factors, attn = yarn_scales(self.cfg, rotaries[0].freqs, step, self.window_changes)
        for rotary in rotaries:
            rotary.set_yarn(factors, attn)
        self.yarn_applied = passed

    def untie_head_if_due(self, step: int) -> None:
        """At the first step past tie_head_until, the embedding leaves the head (record-53): it takes a copy of the
        tied table and of its Adam state; the head keeps both, and any gradient still pending on it (Adam every
        other step), as in the record, where the copy follows the last Adam step before the untie."""
        if self.model.head_tied and not head_tied(self.cfg, step):
            self.model.untie_head()
            copy_adam_state(self.adam, self.model.lm_head.weight, self.model.embed.weight)
            log.info("untied the embedding from the lm head at step %d", step)

    def train_step(self, micro_batches: list[np.ndarray], step: int) -> torch.Tensor:
        """One optimizer step on this rank's micro-batches: the gradient is the mean over the step's tokens on all
        ranks (every micro-batch holds seq_len of them), however many micro-batches the step has."""
        cfg = self.cfg
        self.untie_head_if_due(step)
        self.set_yarn(step)
        tokens, window = self._step_tensors(micro_batches, window_blocks(cfg, step))
        total = torch.zeros((), device=self.ranks.device)
        adam_now = adam_steps(cfg, step)
        step_micro_batches = len(micro_batches) * self.ranks.world   # grad_accum_total, or the batch_schedule's
        weights = self._weights(loss_weights(cfg, step))
        if self.owned_grads:
            self.owned_grads.before_backward()
        for i, seq_t in enumerate(tokens):
            self.reducer.arm(last_micro_batch=i == len(micro_batches) - 1, defer=not adam_now)
            self.next_graph_run()
            loss = self.forward(seq_t[:-1], seq_t[1:], window, target_weights=weights)
            (loss / step_micro_batches).backward()
            total += loss.detach()
        if self.owned_grads:
            self.owned_grads.after_backward()
        self.reducer.wait()
        scale = lr_scale(cfg, step)
        for opt in (self.adam, self.muon):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
        self.muon.param_groups[0]["momentum"] = muon_momentum(cfg, step)
        if adam_now:
            self.adam.step()
        self.muon.step()
        if adam_now:
            self.model.zero_grad(set_to_none=True)
        else:   # Adam's gradients add up over this step and the next
            self.muon.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    def next_graph_run(self) -> None:
        """With CUDA graphs, a new run of the graphs may write over the last run's outputs: each was read already
        (its loss added up, its backward done), so tell torch instead of letting it copy them."""
        if self.owned_grads is not None:   # made exactly when the compiled graphs are CUDA graphs
            torch.compiler.cudagraph_mark_step_begin()

    @torch.no_grad()
    def validate(self, step: int, chunks: list[np.ndarray] | None = None) -> float:
        """Mean loss over the validation tokens (or only `chunks` of them), in eval mode: bf16 with no FP8
        anywhere (the record's metric)."""
        self.model.eval()
        try:
            return self._validation_loss(step, self.val if chunks is None else chunks)
        finally:
            self.model.train()

    def _validation_loss(self, step: int, chunks: list[np.ndarray]) -> float:
        self.set_yarn(step)
        window = torch.tensor(val_window_blocks(self.cfg, step), device=self.ranks.device)
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=self.ranks.device), 0
        bs = self.cfg.block_size
        for chunk in chunks:
            x, y = chunk[:-1], chunk[1:].astype(np.int64)
            pad = -len(x) % bs if self.model.attention == "flex" else 0   # flex needs whole blocks; padded targets are ignored
            x = np.concatenate([x, np.full(pad, BOS, x.dtype)])
            y = np.concatenate([y, np.full(pad, -1, np.int64)])
            self.next_graph_run()
            loss_sum += self.forward(self._tensor(x), self._tensor(y), window, reduction="sum").double()
            count += len(chunk) - 1
        total, n = all_sum([loss_sum.item(), float(count)], self.ranks.device)
        return total / n

    # ---------------------------------------------------------------------------- bookkeeping

    def emit(self, line: str) -> None:
        if self.ranks.is_main:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def record(self, **fields) -> None:
        if self.ranks.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(fields) + "\n")

    def state(self) -> dict:
        return dict(step=self.step, train_ms=self.train_ms, model=self.model.state_dict(),
                    adam=self.adam.state_dict(), muon=self.muon.state_dict(), loader=self.batches.state_dict(),
                    config=self.cfg.to_dict(), world=self.ranks.world, timings=self.timings,
                    head_tied=self.model.head_tied)

    def save(self, path: Path) -> None:
        if self.ranks.is_main:
            checkpoint.save(path, self.state())
            log.info("saved checkpoint %s", path)

    def restore(self, path: Path) -> None:
        st = checkpoint.load(path)
        self.model.load_state_dict(st["model"])
        self.adam.load_state_dict(st["adam"])
        self.muon.load_state_dict(st["muon"])
        self.model.head_tied = bool(st.get("head_tied", False))   # a checkpoint of the step that unties is still tied
        self.batches.load_state_dict(st["loader"])
        self.step, self.train_ms = int(st["step"]), float(st["train_ms"])
        self.timings.update({k: st["timings"][k] for k in ("warmup_s", "first_step_unix", "val_s")})
        if self.ranks.is_main:   # drop metrics logged after this checkpoint: they will be logged again
            mpath = self.out / "metrics.jsonl"
            if mpath.exists():
                rows = [json.loads(ln) for ln in mpath.read_text().splitlines() if ln]
                keep = [json.dumps(r) for r in rows
                        if r["step"] < self.step or (r["step"] == self.step and "train_loss" in r)]
                mpath.write_text("".join(ln + "\n" for ln in keep))
        log.info("resumed from %s at step %d", path, self.step)

    def write_timings(self) -> None:
        if self.ranks.is_main:
            self.timings.update(end_unix=time.time(), steps_done=self.step, train_s=self.train_ms / 1000)
            (self.out / "trainer_timings.json").write_text(json.dumps(self.timings, indent=2))

    def log_train(self, pending) -> None:
        """The loss line of a step whose work is queued: (step, its loss summed over ranks on its way to the
        host, the mark after the step). train_time is the GPU's timeline up to the end of that step."""
        if pending is None:
            return
        step, loss_sum, end = pending
        now = self.train_ms + self.elapsed_ms(self.stretch_mark, end)   # waits for that step, so the loss is home too
        train_loss = loss_sum.item() / self.ranks.world
        cfg, total = self.cfg, self.cfg.total_steps()
        self.emit(f"step:{step}/{total} train_loss:{train_loss:.4f} train_time:{now:.0f}ms "
                  f"step_avg:{now / step:.2f}ms")
        extra = dict(micro_batches=microbatches(cfg, step - 1), micro_batch_len=micro_batch_len(cfg, step - 1)) \
            if cfg.batch_phases() or cfg.seq_len_phases() else {}
        if cfg.doc_len_phases():
            extra["doc_len_cap"] = doc_len_cap(cfg, step - 1)
        if cfg.multi_token_prediction or cfg.prefix_token_loss:
            extra["loss_weights"] = [round(w, 6) for w in loss_weights(cfg, step - 1)]
        self.record(step=step, train_loss=train_loss, train_time_ms=round(now, 1),
                    lr_scale=lr_scale(cfg, step - 1), window=window_blocks(cfg, step - 1), **extra)

    def start_stretch(self) -> float:
        """A stretch of train_time begins (after a sync): returns its start on the host's clock."""
        self.stretch_mark = self.mark()
        return time.perf_counter()

    def end_stretch(self, pending, t0: float) -> None:
        """The stretch begun at t0 ends (for validation, a checkpoint or a stop): the pending step's line,
        then the stretch's wall time once the GPU is done, into train_ms."""
        self.log_train(pending)
        self.sync()
        self.train_ms += 1000 * (time.perf_counter() - t0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        """Now on the timeline of the work queued so far: a CUDA event recorded on the stream, or the clock
        on CPU (where work runs as it is queued). Read against another mark with elapsed_ms."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        """Milliseconds between two marks; waits for the work queued before `end`, no more."""
        if not self.cuda:
            return 1000 * (end - start)
        end.synchronize()
        return start.elapsed_time(end)

    # ---------------------------------------------------------------------------------- phases

    def warm_up(self) -> None:
        """Run every compiled shape on dummy tokens, untimed, then put the model and optimizer back."""
        n = self.cfg.warmup_compile_steps if self.compiled else 0
        if n == 0:
            return
        t0 = time.time()
        initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        gen = np.random.default_rng(self.cfg.seed)
        # Each micro-batch of a step runs the same graphs, so one per step compiles them all (on one GPU a step is 8
        # of them: the other 7 only cost time). CUDA graphs record a graph at its second run, so two.
        local = min(self.cfg.grad_accum_total // self.ranks.world, 1 if self.owned_grads is None else 2)
        for i, step in enumerate(warmup_steps(self.cfg, n, self.model.head_tied)):
            if i == 1:
                self.sync()
                self.warmup_parts["first_step_s"] = time.time() - t0
            mb = [gen.integers(0, BOS, micro_batch_len(self.cfg, step) + 1) for _ in range(local)]
            for seq in mb:
                seq[:: 4096] = BOS
            try:
                self.train_step(mb, step=step)
            except Exception as e:   # noqa: BLE001 - any compile failure of the FP8 head, whatever its type
                if i > 0 or not self.model.fp8_head:
                    raise
                # the FP8 head is the one part whose compiled form depends on the GPU and torch build
                log.warning("the FP8 lm-head failed to compile (%s: %s); continuing with the bf16 head",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.model.fp8_head = False
                self.model.zero_grad(set_to_none=True)
                torch._dynamo.reset()
                self.forward = compile_model(self.model, self.cfg)
                self.train_step(mb, step=0)
        self.sync()
        v0 = time.time()
        self.warmup_parts["steps_s"] = v0 - t0
        # tied again if the last warm-up step untied it: validation at step 0 then finds its graph compiled (the
        # untied one compiles at the first validation after the untie, also untimed)
        self.model.head_tied = head_tied(self.cfg, 0)
        self.validate(0, one_chunk_per_shape(self.val))
        self.sync()
        self.warmup_parts["validation_s"] = time.time() - v0
        self.model.load_state_dict(initial)
        self.model.zero_grad(set_to_none=True)   # Adam's gradients of a last warm-up step that deferred them
        self.adam, self.muon = build_optimizers(self.model, self.cfg)
        self.sync()
        self.timings["compile_cache"] = compile_cache_counts()
        self.timings["compile_phases"] = compile_phases()
        s0 = time.time()
        if trace_cache.save():   # every graph is compiled by now (nothing when off, or when nothing was traced)
            self.warmup_parts["trace_save_s"] = time.time() - s0
        self.timings["warmup_s"] = time.time() - t0
        skipped = cuda_graph_skips() if self.owned_grads is not None else 0
        if skipped:
            log.warning("cuda_graphs: %d compiled graph(s) run without CUDA graphs; TORCH_LOGS=perf_hints says why",
                        skipped)
        log.info("warm-up of %d steps took %.1fs (%s); before it: %s; compile cache: %s; compile time: %s", n,
                 self.timings["warmup_s"],
                 ", ".join(f"{k} {v:.1f}s" for k, v in self.warmup_parts.items() if k not in BEFORE_WARMUP),
                 ", ".join(f"{k} {v:.1f}s" for k, v in self.warmup_parts.items() if k in BEFORE_WARMUP),
                 ", ".join(f"{k} {v}" for k, v in self.timings["compile_cache"].items()) or "no compiles",
                 ", ".join(f"{k} {v:.2f}s" for k, v in self.timings["compile_phases"].items()) or "none")

    def run(self, resume: str | None = None) -> int:
        """Train cfg.total_steps() steps; returns 0 when done, 75 when stopped on request (after a checkpoint)."""
        cfg, total = self.cfg, self.cfg.total_steps()
        self.warm_up()
        ckpt = checkpoint.resolve(resume, self.out)
        if ckpt is not None:
            self.restore(ckpt)
        if self.timings["first_step_unix"] is None:
            self.timings["first_step_unix"] = time.time()
        start_step = self.step
        self.sync()
        t0 = self.start_stretch()
        # A step's loss line is written once the next step is queued: reading the loss waits for its step
        # only, so the host never drains the GPU's queue and every step starts with work already queued.
        pending = None
        while True:
            step, last = self.step, self.step >= total
            if last or step % cfg.val_every == 0:
                self.end_stretch(pending, t0)
                v0 = time.perf_counter()
                val = self.validate(step)
                self.timings["val_s"] += time.perf_counter() - v0
                avg = self.train_ms / max(step, 1)
                self.emit(f"step:{step}/{total} val_loss:{val:.4f} train_time:{self.train_ms:.0f}ms step_avg:{avg:.2f}ms")
                self.record(step=step, val_loss=val, train_time_ms=round(self.train_ms, 1),
                            lr_scale=lr_scale(cfg, step), window=val_window_blocks(cfg, step))
                self.sync()
                t0, pending = self.start_stretch(), None
            if last:
                break
            if step > start_step and step % cfg.stop_check_every == 0 and any_rank(self.stop.asked(), self.ranks.device):
                self.end_stretch(pending, t0)
                self.save(checkpoint.step_path(self.out, step))
                if self.ranks.is_main and self.stop.file.exists():
                    self.stop.file.unlink()   # consumed: the resumed run must not stop again at once
                self.write_timings()
                self.emit(f"stopped on request at step:{step}/{total}; resume with --resume auto")
                barrier()
                return PREEMPTED_EXIT
            if cfg.checkpoint_every and step > start_step and step % cfg.checkpoint_every == 0:
                self.end_stretch(pending, t0)
                self.save(checkpoint.step_path(self.out, step))
                t0, pending = self.start_stretch(), None
            batch = self.batches.next_step(microbatches(cfg, step), micro_batch_len(cfg, step), doc_len_cap(cfg, step))
            loss = self.train_step(batch, step)
            self.step = step + 1
            if self.step % cfg.log_every == 0 or self.step == total:
                queued = (self.step, sum_to_host(loss), self.mark())
                self.log_train(pending)
                pending = queued
        if cfg.checkpoint_final:
            self.save(checkpoint.final_path(self.out))
        self.write_timings()
        mib = 1024 * 1024
        if self.cuda:
            alloc, reserved = torch.cuda.max_memory_allocated() // mib, torch.cuda.max_memory_reserved() // mib
        else:   # CPU: the process's peak resident memory stands for both
            alloc = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        self.emit(f"peak memory allocated: {alloc} MiB reserved: {reserved} MiB")
        barrier()
        return 0
