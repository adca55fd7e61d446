"""
Online self-distillation of a next-token model into a multi-token predictor (docs/METHOD.md).

    python distill.py --k 4                         # the embedded default: CPU, offline
    python distill.py --k 4 --recipe paper          # the paper's recipe instead (RECIPES)
    python distill.py --init DIR --data gsm8k --k 16 --out runs/smol    # any HF checkpoint
    python distill.py --out runs/smol --resume      # continue a killed run exactly
    python distill.py --pretrain --out checkpoints/synth-teacher    # rebuild the default teacher
    torchrun --nproc_per_node 4 distill.py --fsdp --grad-ckpt --init DIR ...   # parallel/

Each micro-batch: draw k in [2, k_max] and an offset; pack it (data.pack); one student forward
gives the student's argmax rollout at every supervised position; the teacher (a frozen copy of
the init checkpoint) scores that rollout in one forward; the loss pulls the student toward the
teacher's argmax (--teacher hard) or distribution (--teacher soft). One student forward/backward
and one teacher forward per micro-batch. train(), at the end, is the whole loop.

Outputs in --out: ckpt/ (the student in the HF layout, its tokenizer, train_state.pt; replaced
atomically every --save-every steps and at the end), log.jsonl (one record per log interval)
and args.json. The run directory's rules (one run at a time, --overwrite, --resume, a diverged
run, --minutes) live in training/, several processes, FSDP2 and --grad-ckpt in parallel/, the
default teacher's recipe in synthetic/, the GPU memory plan in tools/plan_memory.py.
"""
import argparse
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from compat.hf import from_pretrained
from compat.hub import resolve_checkpoint
from compat.tokenizers import TokenizerError, check_vocab, load_tokenizer
from data import DataError, pack, teacher_input
from model import CheckpointError, Config, Transformer
from parallel.distributed import setup_processes, wrap_models
from synthetic.teacher import DEFAULT_TEACHER, SYNTH_TEACHER, build_default_teacher
from synthetic.tokenizer import synthetic_tokenizer
from training.log import fresh_stats, interval_record, warn, write_log
from training.options import (ConfigError, add_config_args, check_options, parse_with_recipe,
                              regions_misfit)
from training.run_dir import (Diverged, Stopped, TrainingError, claimed_out_dir, clear_out_dir,
                              diverged, latest_checkpoint, load_optimizer_state, os_problem,
                              plan_length, planned_total, resume, save_run, schedule_change,
                              stopped, truncate_log, write_args)
from training.samples import accum_steps, load_samples, sample_stream, step_size_note

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Configuration: one dataclass, its defaults written once, argparse built from it


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    recipe: str = arg("default", "default: the settings below, our best at this scale | paper: "
                                 "the paper's (k drawn, regions everywhere, no prefix loss; "
                                 "RECIPES lists them); a flag given beside it still wins")
    init: str = arg("", "teacher/student init: HF dir or hub name; empty = the embedded default "
                        f"teacher ({os.path.relpath(DEFAULT_TEACHER, HERE)}, built if missing)")
    data: str = arg("synthetic", "synthetic | gsm8k | a .jsonl with question/answer rows")
    out: str = arg("runs/mtp-synth", "run directory (checkpoint + log)")
    k: int = arg(4, "k_max: each step draws k uniformly from [2, k_max]")
    fixed_k: bool = arg(False, "ablation: always k = k_max")
    teacher: str = arg("hard", "hard: CE to the teacher's argmax | soft: KL(teacher || student)")
    targets: str = arg("teacher", "teacher: online distillation | data: ablation, CE to ground truth")
    prefix_loss: bool = arg(True, "add NTP cross-entropy on the ground-truth positions (keeps the "
                                  "student's k=1 accuracy; the paper: none)")
    supervise: str = arg("all", "answer: MTP regions only where the answer is written, from the "
                                   "prompt's last token on (what decoding asks for) | all: the "
                                   "prompt too (the paper)")
    batching: str = arg("sorted", "sorted: each step's samples sorted by length into its "
                                  "micro-batches, each packed only as long as its longest (less "
                                  "padding, the same samples and supervision) | random: every "
                                  "micro-batch seq_len long")
    pretrain: bool = arg(False, "train a small model from scratch with plain NTP (builds the "
                                "default teacher); no teacher, no <MTP>")
    reuse_mtp: bool = arg(False, "allow an init that already has an <MTP> token, reusing its id")
    steps: int = arg(800, "optimizer steps in total (a resumed run continues up to this); fewer "
                          "than --warmup + --cooldown: both scaled down to fit (fit_schedule)")
    minutes: float = arg(0.0, "a time budget for the training loop (loading not counted; 0 = none): "
                              "after the first --log-every steps the run plans its length once, "
                              "from their pace (at most --steps), so that its cool-down ends in time")
    seq_len: int = arg(160, "ground-truth tokens per training sequence (N)")
    regions: int = arg(0, "MTP regions per sequence (M); 0 = seq_len // (2 k_max) as in the paper")
    step_tokens: int = arg(2560, "ground-truth tokens per optimizer step; sets gradient "
                                 "accumulation")
    micro_batch: int = arg(8, "sequences per forward pass on each process")
    lr: float = arg(3e-4, "peak learning rate (paper: 1e-5 for 8B models)")
    warmup: int = arg(50, "linear warm-up steps, then constant (paper: 2000)")
    cooldown: int = arg(400, "linear decay to 0 over the last this many steps (0 = constant, as "
                             "the paper); it keeps the student's k=1 accuracy, see README")
    weight_decay: float = arg(0.01, "AdamW weight decay (PyTorch's default)")
    grad_clip: float = arg(1.0, "clip the gradient norm to this; 0 = off")
    log_every: int = arg(20, "steps per log line / log.jsonl record")
    save_every: int = arg(100, "steps per checkpoint (and one at the end)")
    seed: int = arg(0, "seeds data order, k/offset draws and the <MTP> row")
    resume: bool = arg(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = arg(False, "start over in an --out that already holds a run (its checkpoint "
                                 "and log are replaced)")
    compile: bool = arg(False, "torch.compile the student and teacher")
    attention: str = arg("sdpa", "sdpa: boolean-mask SDPA | flex: FlexAttention block mask (CUDA)")
    device: str = arg("auto", "auto | cpu | cuda")
    precision: str = arg("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU | fp32: fp32 on CUDA "
                                 "too (the CPU's numerics, e.g. to reproduce a CPU run faster)")
    threads: int = arg(0, "CPU threads for torch (0 = torch's default)")
    fsdp: bool = arg(False, "under torchrun: shard the student (fp32 master weights, gradients, "
                            "AdamW state) and the frozen teacher across the processes with FSDP2; "
                            "bf16 compute and fp32 gradient reduction on CUDA")
    grad_ckpt: bool = arg(False, "activation checkpointing: each student block keeps only its input "
                                 "and recomputes the rest in backward (long sequences, big micro-batches)")
    plan: bool = arg(False, "the GPU memory plan is a tool of its own: python -m tools.plan_memory "
                            "with the same options")


# The paper's recipe at this scale: its method as published (k drawn uniformly, M = N / (2 k_max)
# regions over the whole sample, one loss on the MTP positions, batches of fixed length), with
# this project's lr schedule at this model size (the paper: constant lr 1e-5 for 8B models).
RECIPES = {"default": {},
           "paper": {"fixed_k": False, "prefix_loss": False, "supervise": "all",
                     "batching": "random", "regions": 0, "seq_len": 160, "step_tokens": 5120,
                     "micro_batch": 32, "lr": 2e-4, "warmup": 50, "cooldown": 400, "steps": 800}}


# -----------------------------------------------------------------------------
# Pure pieces of the method: the lr schedule, the losses, the k/offset draw


def lr_at(step, peak, warmup, cooldown, total):
    """The lr of step `step` (0-based) of a `total`-step run: linear warm-up to `peak` over
    `warmup` steps, then constant (the paper's schedule), then a linear cool-down to 0 over the
    last `cooldown` steps (0: none). train() gives it a warm-up and cool-down that fit in the
    run (fit_schedule)."""
    lr = peak * min(1.0, (step + 1) / max(1, warmup))
    if cooldown:
        lr *= min(1.0, (total - step) / cooldown)
    return lr


def fit_schedule(warmup, cooldown, total):
    """(warm-up, cool-down) of a `total`-step run: as given, or for a run shorter than the two
    together both scaled down in proportion so that they fill it (--steps 3 with 50 + 400: 0 + 3).
    Unfitted, every step of such a run would be cool-down, at a sliver of the peak lr."""
    if warmup + cooldown <= total:
        return warmup, cooldown
    warmup = warmup * total // (warmup + cooldown)
    return warmup, total - warmup


def hard_ce(logits, target, weight, denom=None):
    """Mean cross-entropy of logits (n, V) against target ids (n,), weighted (n,), by hand.
    denom: what to divide the weighted sum by (default weight.sum(); the training loop passes
    the count over the whole optimizer step, so every supervised position weighs the same)."""
    logits = logits.float()
    nll = logits.logsumexp(-1) - logits.gather(-1, target.clamp(min=0)[:, None]).squeeze(-1)
    return (nll * weight).sum() / (weight.sum().clamp(min=1) if denom is None else denom)


def soft_kl(logits, teacher_probs, weight, denom=None):
    """Mean KL(teacher || student) over positions: sum_v t_v (log t_v - log s_v), by hand."""
    logp = logits.float().log_softmax(-1)
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * logp).sum(-1)
    return (kl * weight).sum() / (weight.sum().clamp(min=1) if denom is None else denom)


def n_regions(cfg):
    """M, the MTP regions per sequence: --regions, or seq_len // (2 k_max) as in the paper."""
    return cfg.regions or cfg.seq_len // (2 * cfg.k)


def draw_k_offset(rng, cfg):
    """k uniform in [2, k_max] (or k_max with --fixed-k); offset uniform over one region stride."""
    k = cfg.k if cfg.fixed_k else rng.randint(2, cfg.k)
    return k, rng.randrange(cfg.seq_len // n_regions(cfg))


# -----------------------------------------------------------------------------
# One micro-step of each kind; each returns (loss, stats for logging)


def supervised_weight(P, cfg):
    """(B, M, k) 1.0 at every supervised position of a packed batch (known before any forward)."""
    B, (M, k) = P.idx.size(0), P.sup.shape
    weight = P.valid[:, :, None].expand(B, M, k).float()
    return weight * (P.targets >= 0) if cfg.targets == "data" else weight


def ntp_inputs(P):
    """The ground truth of a packed batch, unpacked: tokens (B, N) and next-token weights (B, N-1),
    1 up to each row's EOS (its padding is not trained on)."""
    x = P.idx[:, P.gt]                                                # (B, N)
    t = torch.arange(1, x.size(1), device=x.device)
    return x, (t[None, :] < P.length[:, None]).float()


def prefix_ntp_loss(all_logits, P, denom=None):
    """Ablation: NTP cross-entropy at every ground-truth position (next ground-truth token).

    denom: the number of such positions in the whole optimizer step (default: in this batch).
    The prefix term keeps a count of its own rather than joining the MTP positions' count: the
    ablation ADDS a mean NTP loss to the mean MTP loss. A pooled count would shrink the MTP
    term by the ~N/(M k) ground-truth positions per row, by a different factor at every k drawn,
    so the ablation would also reweigh the method's own loss. With one micro-batch per step
    (the default config) this is the per-batch mean it always was; with several, it no longer
    grows with their number: every position weighs the same however the step is split."""
    x, real = ntp_inputs(P)
    logits = all_logits[:, P.gt[:-1]]                                 # (B, N-1, V+1)
    return hard_ce(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), real.reshape(-1),
                   denom)


def mtp_step(student, teacher, P, cfg, mtp_id, eos_id, denom, prefix_denom=None):
    """Student forward -> argmax rollout -> teacher forward on it -> loss (docs/METHOD.md,
    "Training objective", steps 1-4).
    denom, prefix_denom: the step's counts (step_denominators); prefix_denom only for --prefix-loss,
    None = this batch is the whole step."""
    B, (M, k) = P.idx.size(0), P.sup.shape
    sup = P.sup.reshape(1, M * k).expand(B, -1)                       # (B, M*k)
    if cfg.prefix_loss:   # logits everywhere: the ground-truth positions are supervised too
        all_logits = student(P.idx, pos=P.pos, mask=P.mask)           # (B, L, V+1)
        logits = all_logits.gather(1, sup[..., None].expand(-1, -1, all_logits.size(-1)))
    else:
        logits = student(P.idx, pos=P.pos, mask=P.mask, out_idx=sup)  # (B, M*k, V+1)
    logits = logits.float().view(B, M, k, -1)
    V = logits.size(-1)
    # <MTP> is an input symbol, never an output: the rollout and confidences leave it out
    readout = logits.detach().index_fill(-1, torch.tensor([mtp_id], device=P.idx.device), -torch.inf)
    rollout = readout.argmax(-1)                                      # (B, M, k): y'_1..y'_k
    weight = supervised_weight(P, cfg)
    if cfg.targets == "data":
        target = P.targets
        loss = hard_ce(logits.view(-1, V), target.view(-1), weight.view(-1), denom)
    else:
        with torch.no_grad():
            t_logits = teacher(teacher_input(P, rollout), pos=P.pos, mask=P.mask, out_idx=sup)
            t_logits = t_logits.float().view(B, M, k, -1)
        target = t_logits.argmax(-1)
        target[P.past_eos] = eos_id                                  # past a row's EOS: EOS
        if cfg.teacher == "hard":
            loss = hard_ce(logits.view(-1, V), target.view(-1), weight.view(-1), denom)
        else:
            t_probs = t_logits.softmax(-1)
            t_probs[P.past_eos] = F.one_hot(torch.tensor(eos_id, device=P.idx.device),
                                            t_probs.size(-1)).float()
            t_probs = F.pad(t_probs, (0, V - t_probs.size(-1)))     # the teacher has no <MTP> column
            loss = soft_kl(logits.view(-1, V), t_probs.view(-1, V), weight.view(-1), denom)
    if cfg.prefix_loss:
        loss = loss + prefix_ntp_loss(all_logits, P, prefix_denom)
    with torch.no_grad():
        conf = readout.softmax(-1).amax(-1)                           # (B, M, k) top-1 confidence
        agree = (rollout == target).float()
    stats = {"conf": (conf * weight).sum((0, 1)), "agree": (agree * weight).sum((0, 1)),
             "count": weight.sum((0, 1)), "tokens": weight.sum()}
    return loss, stats


def ntp_weight(seqs):
    return sum(len(s) - 1 for s in seqs)


def step_denominators(micro, cfg, world, device):
    """(denom, prefix_denom): what the step's losses divide their weighted sums by. Each counts
    its positions over ALL of the step's micro-batches (every rank's), so every position weighs
    the same however the step is split: MTP positions (NTP ones with --pretrain), and the
    ground-truth positions of --prefix-loss (prefix_ntp_loss says why apart)."""
    if cfg.pretrain:
        counts = [sum(ntp_weight(b) for b in micro), 0]
    else:
        counts = [sum(float(supervised_weight(b, cfg).sum()) for b in micro),
                  sum(float(ntp_inputs(b)[1].sum()) for b in micro) if cfg.prefix_loss else 0]
    counts = torch.tensor(counts, dtype=torch.float, device=device)
    if world > 1:
        dist.all_reduce(counts)
    denom, prefix_denom = (counts.clamp(min=1) / world).unbind()   # DDP and FSDP average the
    return denom, prefix_denom                                     # ranks' gradients: undo 1/world


def ntp_step(model, seqs, eos_id, device, denom):
    """Plain next-token training on unpacked rows (--pretrain)."""
    T = max(len(s) for s in seqs)
    x = torch.tensor([s + [eos_id] * (T - len(s)) for s in seqs], device=device)
    w = torch.tensor([[1.0] * (len(s) - 1) + [0.0] * (T - len(s)) for s in seqs], device=device)
    logits = model(x[:, :-1])
    loss = hard_ce(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), w.reshape(-1), denom)
    return loss, {"tokens": w.sum()}


# -----------------------------------------------------------------------------
# One optimizer step: every micro-batch forward and backward, then the update


def uses_bf16(device, cfg):
    """The forward passes' precision: bf16 autocast on CUDA unless --precision fp32; fp32 on the CPU."""
    return device.type == "cuda" and cfg.precision == "auto"


def autocast(device, cfg):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, cfg))


def optimizer_update(student, opt, cfg, loss=0.0):
    """The end of every step: clip the gradient norm, AdamW step, zero the gradients. A step
    whose loss (the step's sum) or gradient norm is not finite raises Diverged before the update."""
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip or math.inf)
    if hasattr(norm, "full_tensor"):    # FSDP: a DTensor of which each rank holds a part
        norm = norm.full_tensor()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise Diverged(loss, float(norm))
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_step(student, teacher, opt, micro, lr, cfg, world, mtp_id, eos_id, device, acc):
    """One optimizer step over the micro-batches: forward/backward each, then clip and AdamW.
    The loss is the mean over ALL of the step's supervised positions (every rank's): it divides
    by their count, taken before any forward (step_denominators). A diverged step raises
    Diverged before it changes any weight."""
    for g in opt.param_groups:
        g["lr"] = lr
    denom, prefix_denom = step_denominators(micro, cfg, world, device)
    amp = autocast(device, cfg)
    step_loss = 0.0
    for i, batch in enumerate(micro):
        # DDP: all-reduce once, after the last micro-batch; FSDP reduce-scatters each one into
        # the sharded gradients (holding unsharded ones across micro-batches costs memory)
        sync_later = world > 1 and not cfg.fsdp and i < len(micro) - 1
        ctx = student.no_sync() if sync_later else torch.enable_grad()
        with ctx, amp:
            if cfg.pretrain:
                loss, st = ntp_step(student, batch, eos_id, device, denom)
            else:
                if cfg.attention == "flex":   # one block mask: the layout is the same for every row
                    from fast.flex import FlexMask
                    batch.mask = FlexMask(batch.mask)
                loss, st = mtp_step(student, teacher, batch, cfg, mtp_id, eos_id, denom, prefix_denom)
        loss.backward()
        step_loss += loss.item()
        acc["loss"] += loss.item()
        acc["tokens"] += float(st["tokens"])
        if "conf" in st:
            for name in ("conf", "agree", "count"):
                acc[name][:len(st[name])] += st[name].float().cpu()
    optimizer_update(student, opt, cfg, step_loss)
    acc["n"] += 1
    acc["lr"] = lr


# -----------------------------------------------------------------------------
# The data: the sample order, each step's micro-batches


def batch_shape(cfg, rows):
    """(ground-truth tokens N, regions M) of one micro-batch: seq_len and n_regions, or with
    --batching sorted only as long as its longest row (rounded up to whole region strides):
    every row keeps the regions it would have had at full length, and no padding is computed."""
    M = n_regions(cfg)
    if cfg.batching == "random":
        return cfg.seq_len, M
    stride = cfg.seq_len // M
    n = min(cfg.seq_len, -(-max(len(r) for r in rows) // stride) * stride)
    return n, min(M, n // stride)


def step_batches(cfg, seqs, starts, stream, rng, rank, world, mtp_id, eos_id, device, accum):
    """One optimizer step's micro-batches: this rank's share of the next samples, packed with
    a fresh k and offset for each micro-batch (--pretrain: the plain token lists)."""
    micro = []
    for _ in range(accum):
        ids = stream.take(cfg.micro_batch * world)[rank * cfg.micro_batch:(rank + 1) * cfg.micro_batch]
        batch = [seqs[i] for i in ids]
        if not cfg.pretrain:
            k, offset = draw_k_offset(rng, cfg)
            n, m = batch_shape(cfg, batch)
            answer = None if starts is None else [starts[i] for i in ids]
            batch = pack(batch, k, offset, m, n, mtp_id, eos_id, answer).to(device)
        micro.append(batch)
    return micro


# -----------------------------------------------------------------------------
# Models, processes, and everything a run loads before its first step


def load_models(cfg, device):
    """(student, teacher, tokenizer). Student = init + <MTP>, trainable; teacher = frozen init,
    in bf16 where the forward passes are (CUDA, unless --precision fp32): it never trains, so it
    needs no fp32 copy. With --fsdp both are loaded on the CPU: sharding moves them to `device`."""
    where = torch.device("cpu") if cfg.fsdp else device
    if cfg.pretrain:                    # the default teacher's recipe (synthetic/teacher.py)
        if cfg.data == "synthetic":
            tok = synthetic_tokenizer(SYNTH_TEACHER.vocab_size)
        else:
            tok = load_tokenizer("gpt2")
        mcfg = Config(**{**SYNTH_TEACHER.summary(), "vocab_size": tok.n_vocab})
        torch.manual_seed(cfg.seed)
        return Transformer(mcfg).to(where), None, tok
    init = cfg.init or DEFAULT_TEACHER
    if not cfg.init and not os.path.isfile(os.path.join(DEFAULT_TEACHER, "model.safetensors")):
        build_default_teacher(lambda argv: train(parse_args(argv)),
                              resuming=latest_checkpoint(DEFAULT_TEACHER, required=False) is not None)
    if not os.path.isdir(init):         # a hub name such as "gpt2": downloaded to $MTP_CACHE
        init = resolve_checkpoint(init)
    tok = load_tokenizer(init)
    teacher_dtype = torch.bfloat16 if uses_bf16(device, cfg) else torch.float32
    teacher = from_pretrained(init, dtype=teacher_dtype, device=where)
    check_vocab(tok, teacher.cfg, init)
    teacher = teacher.requires_grad_(False).eval()
    student = from_pretrained(init, device=where)
    if student.cfg.mtp_token_id is None:
        student.add_mtp_token(seed=cfg.seed)
    elif not cfg.reuse_mtp:
        raise ConfigError(f"{init} already has an <MTP> token (id {student.cfg.mtp_token_id}): it is "
                          "an MTP checkpoint. Continue its run with --out RUN --resume, or pass "
                          "--reuse-mtp to distill it further with the same token")
    return student, teacher, tok


def load_run(cfg, world, device, master):
    """Models, data and a resumed run's state, all loaded and checked before --out changes (with
    --overwrite it is cleared only now): (raw student, student and teacher as the loop calls
    them, tokenizer, samples, optimizer, k/offset rng, data stream, step)."""
    if cfg.attention == "flex" and device.type != "cuda":
        raise ConfigError("--attention flex needs CUDA (FlexAttention has no backward on the CPU); "
                          "use --attention sdpa")
    student, teacher, tok = load_models(cfg, device)
    seqs, starts = load_samples(cfg, tok, warn if master else lambda line: None)
    if not cfg.pretrain and cfg.seq_len + cfg.k - 1 > student.cfg.max_seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} + k {cfg.k} exceeds the model's context "
                          f"({student.cfg.max_seq_len})")
    if cfg.pretrain:
        seqs = [s[:cfg.seq_len] for s in seqs]
    rng = random.Random(cfg.seed)                      # k and offset draws
    stream = sample_stream(cfg, seqs, world)
    step, optim_state = 0, None
    if cfg.resume:
        student, step, optim_state = resume(cfg, rng, stream, device, master, tok)
    elif cfg.overwrite and master:
        clear_out_dir(cfg)
    raw = student
    if not cfg.pretrain:
        raw.cfg.mtp_k_max = cfg.k                     # decode.py reads k_max from the checkpoint
    student, teacher = wrap_models(student, teacher, cfg, world, uses_bf16(device, cfg))
    # after sharding: FSDP2 replaces the parameters with sharded ones, which AdamW must hold
    opt = torch.optim.AdamW(raw.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optim_state is not None:         # the loaded state goes with this function's return
        load_optimizer_state(raw, opt, optim_state, cfg)
    if cfg.resume and master:           # all loaded: only now the log forgets the steps to redo
        truncate_log(os.path.join(cfg.out, "log.jsonl"), step)
    return raw, student, teacher, tok, (seqs, starts), opt, rng, stream, step


# -----------------------------------------------------------------------------
# The command line: argparse built from TrainConfig, the method's settings checked


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p, TrainConfig)
    return TrainConfig(**vars(parse_with_recipe(p, RECIPES, argv)))


def check_config(cfg):
    """Every setting in range before anything is loaded: the run's options (training/options.py),
    then the method's."""
    check_options(cfg)
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)} (got {cfg.recipe!r})")
    if cfg.pretrain:
        return
    if cfg.k < 2:
        raise ConfigError(f"--k is k_max, the largest k drawn; it must be >= 2 (got {cfg.k})")
    if cfg.teacher not in ("hard", "soft") or cfg.targets not in ("teacher", "data"):
        raise ConfigError("--teacher must be hard|soft and --targets teacher|data")
    if cfg.supervise not in ("answer", "all") or cfg.batching not in ("sorted", "random"):
        raise ConfigError("--supervise must be answer|all and --batching sorted|random")
    if cfg.attention not in ("sdpa", "flex"):
        raise ConfigError("--attention must be sdpa or flex")
    if n_regions(cfg) < 1 or cfg.seq_len // n_regions(cfg) < cfg.k:
        raise ConfigError(regions_misfit(cfg, n_regions(cfg)))


# -----------------------------------------------------------------------------
# The training loop


def resumed_schedule(cfg, step):
    """The warning line of a resume whose --steps changes the lr of the steps still to run."""
    saved = planned_total(cfg.out)
    return schedule_change(step, (saved, *fit_schedule(cfg.warmup, cfg.cooldown, saved)),
                           (cfg.steps, *fit_schedule(cfg.warmup, cfg.cooldown, cfg.steps)))


def print_start(cfg, raw, device, world, n_samples, accum, warmup, cooldown, step):
    """The run's first lines on stdout: what trains where, and a schedule fitted to a short run;
    a warning where the step size or (--resume) the lr schedule is not what the options say."""
    n_params = sum(p.numel() for p in raw.parameters())
    print(f"{'pretrain' if cfg.pretrain else 'distill'}: {n_params / 1e6:.2f}M params on {device}"
          f" x{world}{' (FSDP)' if cfg.fsdp else ''}, {n_samples} samples, {accum} x "
          f"{cfg.micro_batch * world} sequences per step", flush=True)
    if (warmup, cooldown) != (cfg.warmup, cfg.cooldown):
        print(f"--steps {cfg.steps} is shorter than --warmup {cfg.warmup} + --cooldown "
              f"{cfg.cooldown}: warm-up {warmup} and cool-down {cooldown} steps instead", flush=True)
    for note in (step_size_note(cfg, world),
                 resumed_schedule(cfg, step) if cfg.resume else None):
        if note:
            warn(note)


def train(cfg):
    """A whole run: the settings checked, --out claimed (training/run_dir.py), everything loaded,
    then one optimizer step at a time, the log and a checkpoint at their intervals. Returns the
    student (unwrapped)."""
    check_config(cfg)
    with claimed_out_dir(cfg, asdict(TrainConfig())):
        rank, world, device = setup_processes(cfg)
        master = rank == 0
        raw, student, teacher, tok, samples, opt, rng, stream, step = load_run(cfg, world, device, master)
        mtp_id, eos_id, accum = raw.cfg.mtp_token_id, tok.eos_id, accum_steps(cfg, world)
        warmup, cooldown = fit_schedule(cfg.warmup, cfg.cooldown, cfg.steps)   # --minutes never needs one
        total = cfg.steps                         # --minutes plans it once, after log_every steps
        if master:
            print_start(cfg, raw, device, world, len(samples[0]), accum, warmup, cooldown, step)
            write_args(cfg, total)
        acc, t_start, start_step = fresh_stats(cfg.k), time.perf_counter(), step
        with open(os.path.join(cfg.out, "log.jsonl"), "a") if master else contextlib.nullcontext() as log:
            try:
                while step < total:
                    micro = step_batches(cfg, *samples, stream, rng, rank, world, mtp_id, eos_id,
                                         device, accum)
                    lr = lr_at(step, cfg.lr, warmup, cooldown, total)
                    try:
                        train_step(student, teacher, opt, micro, lr, cfg, world, mtp_id, eos_id,
                                   device, acc)
                    except Diverged as e:
                        raise TrainingError(diverged(cfg, step + 1, e)) from None
                    step += 1
                    if cfg.minutes and step - start_step == cfg.log_every:
                        total = plan_length(cfg, step, time.perf_counter() - t_start, world, device,
                                            log)
                    if step % cfg.log_every == 0 or step == total:
                        rec = interval_record(cfg, acc, step, world, device)
                        if master:
                            eta = (time.perf_counter() - t_start) / (step - start_step) * (total - step)
                            write_log(rec, total, eta, log)
                        acc = fresh_stats(cfg.k)
                    if step % cfg.save_every == 0 or step == total:
                        t_save = time.perf_counter()
                        save_run(cfg, raw, opt, tok, log, step, total, stream, rng, world, master)
                        acc["t0"] += time.perf_counter() - t_save     # step times exclude saving
            except KeyboardInterrupt:           # Ctrl-C: one line, the last checkpoint kept
                raise Stopped(stopped(cfg, step, total)) from None
        if master:
            print(f"done: {step} steps in {time.perf_counter() - t_start:.0f} s; student in "
                  f"{os.path.join(cfg.out, 'ckpt')}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return raw


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except KeyboardInterrupt:           # Ctrl-C before the loop (train() says where in it)
        print(stopped(cfg), file=sys.stderr)
        sys.exit(130)
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except (ConfigError, CheckpointError, TokenizerError, DataError, TrainingError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:                # a write that failed: a full disk, a folder gone
        print(f"error: {os_problem(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
