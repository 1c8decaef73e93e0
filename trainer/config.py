"""TrainConfig: the one place the recipe's defaults live. Defaults = the record-28 recipe (modded-nanogpt,
2025-08-23: 1695 steps, 3.2787 val loss on 8xH100), where a comment does not say otherwise.

Pure dataclass (no torch import) so the orchestrator can validate `trainer:` overrides from a job
file without a GPU stack. Scalar fields only, so `--set trainer.KEY=VALUE` can reach every one. What a valid
value is, and how the text-valued keys parse: trainer/config_rules.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from fractions import Fraction

from trainer.config_rules import check, layer_set, paired_layers, parse_lr_scales, parse_mlp_lr_scales, parse_phases


@dataclass
class TrainConfig:
    # --- data
    train_files: str = "fineweb_train_*.bin"   # glob inside --data-dir
    val_files: str = "fineweb_val_*.bin"
    val_tokens: int = 10_485_760              # the record's validation budget, exactly
    # tokens per optimizer step = seq_len * grad_accum_total; split over however many ranks there are
    seq_len: int = 48 * 1024                  # tokens per micro-batch per rank (one packed, BOS-aligned sequence)
    grad_accum_total: int = 8                 # micro-batches per step across all ranks (8 GPUs x 1, or 1 GPU x 8)
    val_seq_len: int = 4 * 64 * 1024
    # --- model
    vocab_size: int = 50257
    num_layers: int = 12
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    mlp_ratio: int = 4
    logit_softcap: float = 15.0
    num_value_embeds: int = 3                 # value embeddings mixed into the first and last 3 layers
    # records 63 (untied value embeddings) and 70 (their layout): a table of its own for each of these layers
    # (comma-separated, layers with attention), in place of num_value_embeds' tables shared by the first and last
    # layers; the current record's layers 1, 2, 8, 9, 10 of 11 are ours "2,3,9,10,11". Not yet on the yardstick:
    # "" = record-28's layout
    value_embed_layers: str = ""
    # the value-embedding tables' init: N(0, value_embed_init_std), record-28's 1 (torch's default); record-70 on
    # 0.01 (so that the value starts as the projection's, the embedding's share growing as it trains). Not yet on
    # the yardstick
    value_embed_init_std: float = 1.0
    window_min_blocks: int = 1                # sliding window grows from min to max blocks of 128 tokens
    window_max_blocks: int = 14               # (record-28: 128 -> 1792 tokens, see schedules.window_blocks)
    # record-31 (Yarn, 2025-09-10) and the current record's stages: the long window by phases of training,
    # "END:BLOCKS,..." (the short window stays half of it), in place of record-28's linear growth; "" = that growth.
    # The current record: "1/3:3,2/3:7,1:11".
    window_schedule: str = ""
    # record-31's YaRN: at each change of the long window from W to W' tokens, every rotary frequency f is scaled by
    # r + w (1 - r), r = W / W' and w = clamp((W f / 2 pi - 1) / 31, 0, 1) (a frequency turning under once over W is
    # slowed to keep its angles, one turning 32 times or more is left alone), and the attention scale is multiplied by
    # 1 + 0.2 ln(W' / W) (schedules.yarn_scales). Validation runs with the step's frequencies. Off = fixed frequencies
    yarn: bool = False
    # record-29 on (FlashAttention-3's window_size): a query sees keys up to window x block_size tokens back, exactly,
    # where record-28's BlockMask counts whole blocks (query block - key block < window: up to block_size - 1 tokens
    # fewer; a 1-block window reaches back only to its block's start). One more partial key block per query block
    # (trainer/attention.py). Not yet on the yardstick: off
    window_exact: bool = False
    # the softmax's scale on q . k (QK-normed): record-28's 0.12. Record-31 lowered it to 0.1 with YaRN, whose factor
    # then raises it at each window change (its README), and the records kept 0.1; the yardstick's window row of
    # 2026-12-06 (below) ran YaRN from 0.12
    attn_scale: float = 0.12
    # the long window of the last validation, in blocks (the current record: 20, its extension after training, with
    # no YaRN step for it; the short windows stay at the training's, half its longest long window); 0 = the
    # training's last window. Yardstick (one H100, 2026-12-06, the three together with the current stages): 1.029x
    # ours' time, 3 ms/step cheaper but 0.011-0.028 behind from step 50 on: off, all three
    final_val_window_blocks: int = 0
    attn_gate: bool = True                    # record-28's sparse attention gate: each head's output times
                                              # sigmoid(a zero-initialised projection of the first attn_gate_dims
    attn_gate_dims: int = 12                  # dims of the block's normed input), trained by Muon
    attn_skip_layers: str = "7"               # comma-separated layers with no attention, MLP only (record-28: 7)
    # comma-separated layers with no MLP. Record-30 (SkipMLPBlocks, 2025-09-05) dropped the first layer's MLP and
    # record-35 (DropAttn, 2025-09-21) its attention: attn_skip_layers="0,7" with mlp_skip_layers="0" is their
    # 11-layer model (layer 0 then only mixes in the embeddings). Not yet on the yardstick: "" = every layer has one
    mlp_skip_layers: str = ""
    block_size: int = 128
    fp8_head: bool = True                     # FP8 lm-head matmul on Hopper; ignored elsewhere
    qkv_fp8: bool = True                      # the attention's q, k, v projection forward in FP8 on Hopper; ignored elsewhere
                                              # (record-28: bf16; the FP8 modes train only, validation is bf16)
    # qkv_fp8 and mlp_fp8=all beyond record-28's bf16: on the yardstick (bench/results/recipe-nvidia-h200*.json, 200
    # steps, one H200) they cost no loss per step (final 2.1163 against 2.1144 with both off, one seed each) and
    # save 49 ms/step (568 against 617): time to record-28's loss 0.802x its time, against 0.869x without them
    fused_head_loss: bool = True              # lm head + soft-capped cross-entropy as one op with a Triton kernel (CUDA)
    attention: str = "auto"                   # auto | flex | dense
    mlp_kernel: str = "triton"                # triton (fused relu^2 MLP kernels, CUDA only; CPU runs torch) | torch
    attn_prep: str = "triton"                 # triton (q/k norm + rotary + value mix as one Triton kernel each
                                              # way, CUDA only; CPU runs torch) | torch
    mlp_fp8: str = "all"                      # none | forward (both forward matmuls in FP8) | grad_h (+ the backward's
                                              # grad_h) | all (+ grad_x); the triton MLP on Hopper, ignored elsewhere
    # --- later records' techniques (issue 22), each behind its own switch. The records, numbered as in
    # modded-nanogpt's README: 34 Smear 2025-09-18, 39 CustomBatching 2025-09-30, 41 NorMuon 2025-10-24,
    # 43 CautiousWD 2025-11-10, 55 VeSkipGates 2025-12-29, 62 BigramHashEmbedding 2026-01-19, 83 BigramsSignTrick
    # 2026-05-20. Every new gate reads the first attn_gate_dims (12) dims of its input, as the records' gates do.
    # "yardstick": bench/recipe.py on one H200, 200 steps, time to record-28's loss against record-28's time, one
    # seed each; with all of them off 0.813 in the same lease, 0.802 twice in an earlier one (bench/NOTES.md)
    smear: bool = False                       # record-34: each embedding plus a gated share of the previous token's
                                              # (trainer/embeddings.py). Yardstick (2026-12-04, the gate then
                                              # trained by Muon at 0.05, record-34's): 0.815, no gain. Its gate now
                                              # trains as record-52 on: Adam at 0.008 x 0.01 (record-52's README: a
                                              # Muon-trained gate was noisy at schedule transitions). Off until the
                                              # yardstick has that form
    adam_smear_gate_lr: float = 0.008 * 0.01
    bigram_embed: bool = True                 # record-62: a hashed (previous token, token) embedding added to the first
    bigram_rows: int = 50304 * 15             # bigram_dim dims of every block's input, times a per-layer weight (init
    bigram_dim: int = 192                     # 0.05); rows, dim and the sign trick's 8192 sign rows: record-83's.
    bigram_sign_rows: int = 8192              # Yardstick: 0.775 (loss lower at every point, +10 ms/step): on
    # records 83-89 (read in record-83's script): the input embedding's and the bigram's terms join the stream with
    # the attention's output, x + attn(norm(x)) + a_i x0 + b_i bigram before the MLP, where record-28 mixes x0 into
    # the block's input (and ours the bigram too). The bigram's term of layer 0 goes into the stream before it; a
    # layer without attention takes neither. a_i (from 0: a weight of the block's own, record-28's second lambda then
    # unused) and the bigram's b_i (from 0.05) train by Adam at adam_inject_lr, betas (0.9, 0.95), as the record's
    # x0_lambdas and bigram_lambdas; without it they train with the scalars. Not yet on the yardstick: off
    inject_after_attention: bool = False
    adam_inject_lr: float = 0.008
    # record-55: each head's value embedding times 2*sigmoid(w . g), in place of its lambda, w per layer; g as
    # record-70 on: the first 6 dims of the attention's normed input and the first 6 of the value embedding, and w
    # trained by Adam at adam_gate_lr, betas (0.9, 0.99) (record-89). Yardstick (2026-12-04, with skip_gate, in
    # record-55's form then: g = x[:12], w trained by Muon): 0.825, +9 ms/step, same final loss: off
    value_embed_gate: bool = False
    adam_gate_lr: float = 0.008
    skip_gate: bool = False                   # record-55: each U-net skip times 2*sigmoid(w . x0[:12]), one w, trained
    adam_skip_gate_lr: float = 0.008 * 0.05   # by Adam at the record's 0.05x of the base lr 0.008, betas (0.9, 0.99)
    logit_rescale: bool = False               # record-54: logits 23*sigmoid((z+5)/7.5) for record-28's 30*sigmoid(z/7.5),
                                              # i.e. 11.5*tanh((z+5)/15) for 15*tanh(z/15) up to a constant the
                                              # softmax ignores (softcap_form below; the fused loss kernel takes it).
                                              # Yardstick (one H100): 1.012x ours' time, final loss +0.004: off
    # record-53 (MultiTokenPrediction, 2025-12-22): the one head also predicts the tokens 2 and 3 positions on, from
    # the same logits; the training loss is sum_k w_k CE(logits_t, token_{t+1+k}) with the record's weights by
    # thirds of training, each ramping linearly: (1, 0.5, 0.25 -> 0), (1, 0.5 -> 0), (1) (schedules.mtp_weights).
    # Targets cross documents, as the record's do; validation stays plain next-token CE, and the logged
    # train_loss is the weighted sum. Yardstick (one H100, 2026-12-05, same call): 1.013x ours' time, final loss
    # 2.0799 against 2.0762 (behind until step 125, even from 150 on): no gain at 200 steps, off
    multi_token_prediction: bool = False
    # record-88 (PrefixTokenPrediction, 2026-07-13): one more target a position, the longest proper byte prefix of
    # the next token that is itself a token (none for single bytes: skipped), weighted 0.25 over the first third,
    # 0.25 -> 0 over the second, then off (schedules.prefix_weight). Needs the GPT-2 vocabulary: vocab_file, or ""
    # for tiktoken's gpt2 (its cache on an offline node; trainer/vocab.py). Not yet on the yardstick: off
    prefix_token_loss: bool = False
    vocab_file: str = ""
    # record-49 (PartialKeyOffset, 2025-12-14): in the long-window layers, the key dims that rotary leaves unrotated
    # (head_dim/4..head_dim/2 and 3/4 head_dim..head_dim) hold the previous position's values, so one key carries
    # two positions (one-layer induction). Not yet on the yardstick: off
    key_offset: bool = False
    # record-77 (SimplifyHC, 2026-03-06): every layer after this one takes its attention's input from this layer's
    # output, saved, not from the residual as it goes on (the MLPs still read the residual): the record's layer 7 of
    # 11, our 8 (our layer 0 is the one the record dropped). The record: 1.446 -> 1.435 min. -1 = off. Not yet on the
    # yardstick
    attn_input_layer: int = -1
    # record-40 (Backout, 2025-10-04): before the head, the final residual loses backout_init (0.5 at start, trained
    # with the scalars by Adam) times this layer's output: what the first layers wrote only as context for later
    # layers, not for the prediction. The record's layer 8 of its 12 (layer 0 dropped), our 8; it came with the
    # record's step cut 2380 -> 2290 (with cool-down and beta tuning). MUDD carries its own backout (mudd_backout):
    # not with mudd. -1 = off. Not yet on the yardstick
    backout_layer: int = -1
    backout_init: float = 0.5
    # record-82 (XSAGatedLayers, 2026-04-29): in every attention layer without paired heads, each head's output loses
    # tanh(alpha) of its component along the token's own value (arXiv:2603.09078), alpha per layer and head, zero
    # at start, trained by Adam as the record's: at adam_xsa_lr (its base lr 0.008, where our scalars' is 0.04), betas
    # (0.9, 0.95), no weight decay. The record: 30 fewer steps of 1440 for +0.9 s (0.68 s net of 85.9). Not yet on
    # the yardstick: off
    xsa: bool = False
    adam_xsa_lr: float = 0.008
    # record-89's learned residual scales ("exponential decay of the residual stream", records 45 and 73-74): every
    # sublayer adds as x = r * x + p * f(x), r learned from sqrt(1.1) (the stream grows 1.1x a layer, so each
    # earlier layer's share of it decays) and p from 1, per layer and sublayer, trained by Adam in two groups of
    # their own as the record's are: r at the scalars' lr (the record's 0.04), p at a fifth of it (its 0.008), both
    # at betas (0.9, 0.95); r replaces record-28's per-block weight of the stream (the record has no second one).
    # Not yet on the yardstick: off
    residual_scales: bool = False
    # record-85 (2026-05): lightweight dynamically composable attention in one layer, post-only: each head's output
    # gains w2[t, h] x (sum over heads g of w1[t, g] x head g's softmax over the last dc_window keys) @ head h's
    # values, w1 and w2 per token from a small net on the input of layer dc_gate_layer (trainer/dc_attention.py).
    # The record: its layer 10 of 11 with the net at its layer 4, i.e. ours 11 and 5; a 112-token band; the net
    # trained by Adam at 0.1x its base lr 0.008, betas (0.9, 0.99). Not yet on the yardstick: -1 = off
    dc_layer: int = -1
    dc_gate_layer: int = 5
    dc_window: int = 112
    adam_dc_lr: float = 0.008 * 0.1
    # record-64 (MimeticValueOutput, 2026-01-30): the value and output projections start as sqrt(beta) I and
    # -sqrt(beta) I plus N(0, 0.01) noise (Attention.mimetic_vo_init_), so attention contributes from step 1 where
    # record-28 zeroes the output projection. The record's beta: 0.05 (1.65 -> 1.63 min). Needs num_heads x
    # head_dim = model_dim. Yardstick (one H100, 0.05, the same ms/step): seed 0 ahead of ours by 0.007-0.017 from
    # step 100 to 225 (2026-12-07, the call ended at step 237), seed 1 0.989x ours' time (97.4 against 98.5 s,
    # 2026-12-07, ours in the same call): on. 0 = record-28's zero output projection
    attn_vo_init: float = 0.05
    # record-58 (PairedHeadAttention, 2026-01-07): in these layers (comma-separated, short-window layers only) heads
    # go in pairs, and each pair attends as one head over a sequence twice as long, the two heads' q, k and v of
    # a token side by side (positions 2t and 2t+1, rotated as such): a query then also weighs its partner head's
    # keys in the same softmax. The window, counted in that sequence, reaches half as many tokens back. The record
    # pairs 4 short-window layers of 11, its [0, 2, 5, 9], i.e. ours "1,3,6,10" (its first layer is our second).
    # Yardstick (one H100, 2026-12-05, same call): 0.963x ours' time to record-28's loss (111.8 against 116.1 s),
    # final loss 2.0600 against 2.0773, lower at every point; +2.8 ms/step (0.4%): on. "" = off
    paired_head_layers: str = "1,3,6,10"
    # record-81 (MuddFormer, 2026-04-22), in the current record's trimmed form: a small net on the residual gives each
    # token coefficients over earlier hidden states, mixed into the last layer's values and residual and into the
    # residual after it; its bias starts the final residual at minus half of layer 2L/3's output (record-40's
    # backout, which record-81 absorbed). Trained by Adam at adam_mudd_lr, betas (0.9, 0.99) as the record's.
    # trainer/mudd.py. Yardstick (one H100, 2026-12-06): 1.112x ours' time, final loss 2.0955 against 2.0596,
    # +14 ms/step: off (bench/NOTES.md: what differs from the record, what to try next)
    mudd: bool = False
    adam_mudd_lr: float = 0.008 * 0.25        # the record's 0.25x of its base Adam lr 0.008
    mudd_backout: float = -0.5                # the final residual's coefficient on layer 2L/3's output at init (record)
    # record-46 (BatchSizeSchedule, 2025-11-29): the batch grows over training, in micro-batches per step, so no
    # tensor changes shape (no recompile). "END:COUNT,..." runs COUNT micro-batches (every rank an equal share) on the
    # steps below END x steps (END a fraction such as 1/3; the last END is 1); "" = off, grad_accum_total every step.
    # The lrs stay tuned for grad_accum_total: a phase of COUNT runs every lr times (COUNT / grad_accum_total) **
    # batch_lr_exponent, and the cool-down still ends at 0.1 x the first phase's lr. The record: 131,072 / 262,144 /
    # 393,216 tokens per step over thirds of training, lrs (bs / 131,072) ** 0.6 = 1, 1.51, 1.93 times its first
    # phase's; here seq_len=16384, grad_accum_total=24, "1/3:8,2/3:16,1:24" (0.52, 0.78, 1 times ours).
    # Yardstick (H100s, 2026-12-05, 260 steps): "1/3:3,2/3:5,1:8" of 49,152-token micro-batches reached record-28's
    # loss in 0.861x ours' time, but 3 and 5 do not split over 8 ranks; the 8-rank form above took 1.231x (a
    # 16K micro-batch costs 62% of a 48K one). Off (bench/NOTES.md); the default seq_len_schedule must be '' with it
    batch_schedule: str = ""
    # record-46's own form on 8 GPUs (one micro-batch per rank): the micro-batch grows, not their count.
    # "END:TOKENS,..." runs grad_accum_total micro-batches of TOKENS (a multiple of block_size, at most seq_len)
    # on the steps below END x steps; each length compiles once, in the warm-up. The lr ties to the step's
    # tokens as above. The record: "1/3:16384,2/3:32768,1:49152". Not with batch_schedule; "" = off.
    # Yardstick (H100, 260 steps): the record's form 1.008x ours' time (against ours of another call): the same
    # loss per token as the 0.861x form, lost to the first third's short micro-batches (2026-12-05). With
    # cuda_graphs (2026-12-06, one H100, ours in the same call): 0.902x ours' time, a 16K micro-batch 29.5 ms
    # against 82 ms for a 48K one (bench/NOTES.md). On, with cuda_graphs; a seq_len below 49152 needs its own
    seq_len_schedule: str = "1/3:16384,2/3:32768,1:49152"
    # the record's document-length cap (train_max_seq_len, its stages since record-46): a micro-batch holds
    # documents' first TOKENS tokens back to back, the rest of a longer document skipped, on the steps below END x
    # steps; "END:TOKENS,..." (the current record: "1/3:896,1:2048"), a phase of TOKENS >= seq_len is no cap.
    # More document starts and no long-context tail early on. Not yet on the yardstick: "" = off, whole documents
    doc_len_schedule: str = ""
    batch_lr_exponent: float = 0.6
    # record-89's stage lrs, in place of the exponent: "1,1.52,1.73" (its x1.0 / x1.52 / x1.73 of the first stage's
    # lr; (16/8)^0.6 and (24/8)^0.5), one multiplier per phase of the batch or sequence-length schedule, divided by
    # the last's so the full batch still runs the configured lrs (ours: 0.578 / 0.879 / 1 where the exponent 0.6
    # gives 0.517 / 0.784 / 1). A schedule, no graph change. Yardstick (one H100, 2026-12-07, ours in the same call
    # or the one before on the same machine): 0.992x ours' time at seed 0, 0.978x at seed 1 (96.3 against 98.5 s),
    # ahead at every val point in both: on, for the default's three phases ("" = the exponent's; another schedule
    # needs its own multipliers, or "")
    batch_lr_scales: str = "1,1.52,1.73"
    # record-51 (2025-12-19 RetieLMHead) ties the embedding to the head: one (padded vocab, dim) table, initialised
    # N(0, 0.005) in place of the head's zero init, is both the input lookup and the head weight (its gradient the
    # sum of both uses), trained by Adam at the head's lr (0.008). Record-53 (2025-12-22 MultiTokenPrediction) unties
    # them at step ceil(2/3 * steps): the embedding becomes its own table again, a copy of the tied one with a copy of
    # its Adam moments and step count, and trains at the head's lr too, not at adam_embed_lr (its README: the untied
    # embedding gained nothing from a multiplier). The fraction of training tied; 0 = never (record-28), 1 = always.
    # Yardstick (one H100, 2026-12-06, 2/3 with multi_token_prediction, as record-53 ran them): 1.026x ours' time,
    # 0.19 behind at step 100, 0.006 at the end: off
    tie_head_until: float = 0.0
    # --- schedule
    # record-28 ran 1695 steps. With the bigram embedding, NorMuon and paired heads on: 1484, the larger of two
    # estimates of the steps to the same loss, (a) the records' own step counts, 1695 x 1600/1765 (record-62's
    # bigram, from record-61's) x 2315/2330 (record-41's NorMuon, from record-40's) x 1775/1840 (record-58's paired
    # heads, from record-57's) = 1473, and (b) the yardstick, where the bigram embedding and NorMuon reach record-28's
    # loss at step 182.1 of 200 (1695 x 0.9105 = 1543) and paired heads then at step 175.1 where ours of the same
    # call did at 182.3: 1543 x 175.1 / 182.3 = 1484. With the seq_len_schedule: 1998, the larger of (a) 1484 x
    # 2160/2225 (record-46 ran 2160 steps where record-45 ran 2225) = 1441 and (b) the yardstick, where the schedule
    # reached record-28's loss at step 235.2 where ours of the same call did at 174.7: 1484 x 235.2 / 174.7 = 1998.
    # The two disagree by 39%; the 8xH100 projection and its range: bench/NOTES.md
    steps: int = 1998
    cooldown_frac: float = 0.45
    # where the cool-down ends, as a fraction of the (first phase's) lr: record-28's 0.1; record-72 (ShortWindow,
    # 2026-02-10) raised it to 0.15, and the current record cools over 0.60 of training. Yardstick (one H100,
    # 2026-12-07, the two together): 1.011x ours' time, ahead until step 200 and behind from 225: 0.1 and 0.45 stay
    lr_floor: float = 0.1
    # record-89's extension: this many steps after `steps`, at the cool-down's end (lr_floor), the last phase's batch
    # and loss weights, and a long window of extension_window_blocks (the record: 15 steps after its 1270, the windows
    # 11 -> 13 blocks, short 5 -> 6; its final validation then 20). Every schedule still spans `steps`; the run and
    # its step lines count steps + extension_steps, and Muon's momentum cool-down ends with them. Not yet on the
    # yardstick: 0 = off
    extension_steps: int = 0
    extension_window_blocks: int = 0          # 0 = the training's last window
    warmup_steps: int = 0
    val_every: int = 125
    # --- optimizer
    muon_lr: float = 0.05
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 300
    muon_momentum_cooldown_steps: int = 0     # record-39: 50, momentum back down to the warm-up start at the end
    # record-43's cautious weight decay: the update gets + lr * wd * p where the update and p agree in sign (the
    # step then shrinks |p|), so the decay follows the lr schedule; 0 = off (record-43: 1.2 at its Muon lr 0.03).
    # Yardstick (one H100, 2026-12-06): 0.43 (the record's lr^2 x wd at our lr 0.05) 0.997x ours' time: noise, off
    muon_cautious_wd: float = 0.0
    # record-80 (2026-04-08, PairedHeadMuon): Muon orthogonalises Q and K per pair of heads (each block of
    # 2 x head_dim rows its own matrix, for NorMuon too) instead of each as one matrix of all heads; V stays whole.
    # The record: 10 fewer steps of 1490 (0.4 s). Yardstick (one H100, 2026-12-07, seed 1, ours in the call before
    # on the same machine): 0.969x ours' time (95.4 against 98.5 s), the same ms/step, ahead at every val point: on.
    # Needs an even num_heads
    muon_qk_pairs: bool = True
    muon_variant: str = "normuon"             # muon | normuon: record-41's neuron-wise normalised update
    normuon_beta2: float = 0.95               # (trainer/optim.py; the record ran it at Muon lr 0.06, ours 0.05).
                                              # Yardstick: 0.798 alone, 0.758 with bigram_embed (bigram alone
                                              # 0.775); ms/step unchanged: on
    muon_polynomial: str = "newton_schulz"    # newton_schulz (record-28) | polar_express (later records)
    # record-48 on: Muon's lr times 2 for the MLP's c_fc and 4 for its c_proj, the attention's matrices at 1 (the
    # current record: 0.023 x 1.73 in its last stage, i.e. ~0.04, 0.08 and 0.16 per matrix where ours runs 0.05 for
    # all). "C_FC,C_PROJ" multipliers, "" = record-28's 1 and 1. Not yet on the yardstick: with it, muon_lr=0.04 is the
    # record's own lrs
    muon_mlp_lr_scales: str = ""
    # record-28: one Adam lr 0.008 times a per-parameter multiplier: 75 for the embeddings, 1 for the head, 5 for
    # the scalar gains
    adam_embed_lr: float = 0.6
    adam_head_lr: float = 0.008
    adam_scalar_lr: float = 0.04
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    # record-89 (2026-07-17): Adam betas by group, (0.5, 0.95) for the head and the token embedding, (0.75, 0.95)
    # for the value-embedding and bigram tables, (0.9, 0.99) for the scalar gains, in place of adam_beta1/2 for all.
    # An optimizer rule, no graph change. Not yet on the yardstick: off
    adam_group_betas: bool = False
    # record-89: cautious weight decay on the Adam tables, tied to the lr schedule (trainer/optim.py CautiousAdam):
    # p -= lr^2 * wd * mult * p where Adam's step shrinks |p|, wd the record's 0.005, mult 150 for the head and
    # token embedding and 5 for the value and bigram tables at the record's lrs for them. Not yet on the yardstick:
    # 0 = off
    adam_cautious_wd: float = 0.0
    # record-28's eps is 1e-10 on the gradient of a summed loss (each rank's 49,152-token micro-batch, averaged
    # over 8 ranks); ours is the mean over the step's tokens, 49,152x smaller, so the same damping is 1e-10/49152
    adam_eps: float = 1e-10 / 49152
    adam_every_other_step: bool = False       # record-39: Adam steps on odd steps only, on two steps' summed gradients
                                              # (reduced across ranks once); Muon steps every step. Yardstick on one
                                              # GPU (no reduction to save): 574.6 ms/step, final loss 2.1609, not
                                              # reaching the target: off (8 ranks untried)
    # --- runtime
    seed: int = 0
    device: str = "auto"                      # auto | cuda | cpu
    compile: bool = True                      # torch.compile on CUDA; off on CPU
    cuda_graphs: bool = True                  # compiled graphs replayed as CUDA graphs (torch.compile's
                                              # reduce-overhead): a micro-batch's forward and backward each one
                                              # launch, not hundreds. H100: a 16K micro-batch 47 ms without, 29.5
                                              # with; a 48K one 82 either way (bench/NOTES.md): what makes the
                                              # seq_len_schedule pay. Not yet run on more than one GPU
    # dynamo's traces cached with the compile caches (torch's experimental caching_precompile, trainer/trace_cache.py):
    # a warm process loads them where it would read the model's Python again, 3.5-4.2 s a graph on an H100. One H100
    # (2026-12-08, torch 2.11, CUDA graphs, bench/cache_probe.yaml: cold, same node, fresh node from the store):
    # warm-up 184.6 s cold, then 3.6 s and 3.9 s (2.0% and 2.1%) with it; 198.7, 24.4 and 24.2 s (12.3%, 12.2%)
    # without, on the same machine. Seed start to first step, load and save included: 13.7% and 14.4% with it,
    # 19.9% and 18.8% without. The same val loss and ms/step in all six launches. A cache that fails to load or
    # save costs a warning and a trace. Each device keeps its own traces; eight ranks have not run it
    compile_trace_cache: bool = True
    warmup_compile_steps: int = 3             # untimed steps on dummy data (the first compiles), then the state is reset
    checkpoint_every: int = 0
    checkpoint_final: bool = True
    stop_check_every: int = 10                # how often ranks agree on a checkpoint-and-stop request
    log_every: int = 1

    def total_steps(self) -> int:
        """The steps the run trains: the schedules' `steps`, then the extension's."""
        return self.steps + self.extension_steps

    def softcap_form(self) -> tuple[float, float, float]:
        """(cap, div, offset) of the soft-capped logits s = cap * tanh((z + offset) / div)."""
        if self.logit_rescale:
            return 11.5, 15.0, 5.0
        return self.logit_softcap, self.logit_softcap, 0.0

    def validate(self) -> "TrainConfig":
        """Raise ValueError('key: problem') on the first bad value (trainer/config_rules.py); returns self."""
        check(self)
        return self

    def skipped_attention_layers(self) -> frozenset[int]:
        """attn_skip_layers as a set of layer indices; ValueError on anything but layers of this model."""
        return layer_set(self, "attn_skip_layers")

    def value_embed_layer_set(self) -> frozenset[int]:
        """value_embed_layers as a set; ValueError unless each is a layer of this model with attention."""
        layers = layer_set(self, "value_embed_layers")
        no_attention = sorted(layers & self.skipped_attention_layers())
        if no_attention:
            raise ValueError(f"value_embed_layers: layer {no_attention[0]} has no attention (attn_skip_layers), so no "
                             "values to add a value embedding to; list layers with attention")
        return layers

    def skipped_mlp_layers(self) -> frozenset[int]:
        """mlp_skip_layers as a set of layer indices; ValueError on anything but layers of this model."""
        return layer_set(self, "mlp_skip_layers")

    def paired_layers(self) -> frozenset[int]:
        """paired_head_layers as a set of layer indices; ValueError unless each is a short-window attention layer
        of this model with an even head count."""
        return paired_layers(self)

    def batch_phases(self) -> tuple[tuple[Fraction, int], ...]:
        """batch_schedule as ((END, COUNT), ...), () when off; ValueError naming the key on anything else."""
        return parse_phases("batch_schedule", str(self.batch_schedule), "COUNT", 1, self.grad_accum_total, 1,
                            "'1/3:8,2/3:16,1:24' (steps below END x steps run COUNT micro-batches)")

    def seq_len_phases(self) -> tuple[tuple[Fraction, int], ...]:
        """seq_len_schedule as ((END, TOKENS), ...), () when off; ValueError naming the key on anything else."""
        return parse_phases("seq_len_schedule", str(self.seq_len_schedule), "TOKENS", self.block_size, self.seq_len,
                            self.block_size, "'1/3:16384,2/3:32768,1:49152' (steps below END x steps run "
                            "micro-batches of TOKENS)")

    def doc_len_phases(self) -> tuple[tuple[Fraction, int], ...]:
        """doc_len_schedule as ((END, TOKENS), ...), () when off; ValueError naming the key on anything else."""
        return parse_phases("doc_len_schedule", str(self.doc_len_schedule), "TOKENS", 2, 1 << 30, 1,
                            "'1/3:896,1:2048' (steps below END x steps cut each document after TOKENS tokens)")

    def mlp_lr_scales(self) -> tuple[float, float] | None:
        """muon_mlp_lr_scales as (c_fc, c_proj) multipliers of Muon's lr, None when unset; ValueError otherwise."""
        return parse_mlp_lr_scales(str(self.muon_mlp_lr_scales))

    def phase_lr_scales(self) -> tuple[float, ...]:
        """batch_lr_scales as floats divided by the last one; () when unset. ValueError unless it has one positive
        number per phase of the batch or sequence-length schedule."""
        return parse_lr_scales(str(self.batch_lr_scales), len(self.batch_phases() or self.seq_len_phases()))

    def window_phases(self) -> tuple[tuple[Fraction, int], ...]:
        """window_schedule as ((END, BLOCKS), ...), () when off; ValueError naming the key on anything else."""
        return parse_phases("window_schedule", str(self.window_schedule), "BLOCKS", 1, 1 << 20, 1,
                            "'1/3:3,2/3:7,1:11' (steps below END x steps attend BLOCKS blocks back in the long-window "
                            "layers, half of it in the others)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown TrainConfig key")
        return cls(**d).validate()
