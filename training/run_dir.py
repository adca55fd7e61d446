"""
The run directory (--out) of distill.py, kept safe: one run at a time in it (RunLock), nothing
of a run replaced unasked (--overwrite, check_out_dir), --resume continuing a run exactly or
refusing (check_resume, resume), checkpoints swapped in whole (save_checkpoint), a diverged run
stopped with its last good checkpoint named (Diverged), Ctrl-C's one line (Stopped), and
--minutes' plan of a run's length (plan_steps), written to args.json with every setting. It
imports nothing of distill.py: what it needs of TrainConfig (its defaults) comes in as an
argument.

    OUT/lock        "pid host" of the process whose run uses OUT, while it runs
    OUT/ckpt/       the student (HF layout), its tokenizer, train_state.pt (optimizer, step,
                    data position, RNG states, the run's settings)
    OUT/log.jsonl   one record per log interval, per checkpoint, and --minutes' plan
    OUT/args.json   the run's settings and the step count it runs to
    OUT/bench_*     bench.py's results for OUT/ckpt (by default), cleared with the run

A damaged file of a run (a cut train_state.pt, a log line cut by a kill) is named with what to
do, never a traceback: a log's repairable damage is dropped with a warning (truncate_log).
"""
import contextlib
import errno
import json
import os
import shutil
import socket
from dataclasses import asdict

import torch
import torch.distributed as dist

from compat.hf import from_pretrained, save_pretrained
from compat.tokenizers import check_vocab
from model import CheckpointError
from training.log import warn
from training.options import ConfigError, option

RUN_FILES = ("ckpt", "ckpt.old", "ckpt.tmp", "log.jsonl", "args.json")    # what a run writes
BENCH_FILES = (".md", ".json", ".png")     # bench.py's OUT/bench_<data>.* beside the checkpoint


class TrainingError(RuntimeError):
    """A run that cannot go on: the message says why, and what of the run is kept."""


class Stopped(TrainingError):
    """Ctrl-C: the run stopped where it was; the message says what of it is kept."""


DISK_FULL = ("the disk is full (no space left on device): free some space, then continue with "
             "--resume")


def os_problem(e):
    """An OSError in words, a full disk by name."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DISK_FULL
    return f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}"


def write_problem(e, folder):
    """A failed write in words. torch.save and safetensors report a full disk as their own
    RuntimeError and SafetensorError, with no errno: a disk left with (almost) no free space
    after one is a full disk too."""
    if isinstance(e, OSError):
        return os_problem(e)
    text = str(e)
    with contextlib.suppress(OSError):
        if "No space left" in text or "StorageFull" in text or \
                shutil.disk_usage(folder).free < 1 << 20:
            return DISK_FULL
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# -----------------------------------------------------------------------------
# One run at a time in --out, nothing of a run replaced unasked


class RunLock:
    """OUT/lock holds "pid host" of the process whose run uses OUT, while it runs: a second run
    into OUT is refused, naming the first; the lock of a process that is gone (same host, no such
    pid: killed) is taken over. Creates OUT, and removes it again if the run left it empty."""

    def __init__(self, out):
        self.out, self.path, self.made = out, os.path.join(out, "lock"), not os.path.isdir(out)
        self.me = f"{os.getpid()} {socket.gethostname()}"

    def __enter__(self):
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"--out {self.out} is a file: give a directory")
        try:
            os.makedirs(self.out, exist_ok=True)
            for _ in range(2):                  # a second try after removing a stale lock
                try:
                    return self.write()
                except FileExistsError:
                    self.remove_stale()
        except OSError as e:
            problem = os_problem(e).replace("continue with --resume", "run this again")
            raise ConfigError(f"--out {self.out} cannot be written: {problem}") from None
        raise ConfigError(f"{self.path} is taken by another run: try again, or pick another --out")

    def write(self):
        """Create the lock with "pid host" in it; a lock left empty by a failed write (a full
        disk) would read as another run's, so it is removed again."""
        with open(self.path, "x") as f:
            try:
                f.write(self.me + "\n")
                f.flush()
            except OSError:
                os.remove(self.path)
                raise

    def remove_stale(self):
        with open(self.path, "rb") as f:
            text = f.read(200).decode("utf-8", "replace")
        words = text.split()
        if len(words) != 2 or not words[0].isdigit():   # empty, or not written by RunLock
            held = " ".join(words)
            held = repr(held[:40]) if held.isprintable() and "\ufffd" not in held else \
                "bytes that are no text"
            raise ConfigError(f"{self.path} names no run (it holds {held}, not 'pid host'): if no "
                              f"run uses {self.out}, delete it and try again")
        pid, host = words
        alive = host != socket.gethostname()    # another machine's process: cannot tell, so alive
        if not alive and int(pid) > 0:
            try:
                os.kill(int(pid), 0)
                alive = True
            except PermissionError:
                alive = True
            except ProcessLookupError:
                pass
        if alive:
            raise ConfigError(f"{self.out} is in use by another run (pid {pid} on {host}): wait for "
                              "it to end or pick another --out; if that process is gone, delete "
                              f"{self.path}")
        os.remove(self.path)

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            with open(self.path) as f:
                if f.read().strip() == self.me:
                    os.remove(self.path)
            if self.made and not os.listdir(self.out):
                os.rmdir(self.out)


@contextlib.contextmanager
def claimed_out_dir(cfg, defaults):
    """--out for the length of a run: locked by its first process (RunLock; torchrun's others
    share its lock) and checked by every process before they meet, when none has written yet
    (check_out_dir). defaults: TrainConfig's, as a dict."""
    with RunLock(cfg.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        check_out_dir(cfg, defaults)
        yield


def lies_inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def run_files(out):
    """The names in `out` of what a run writes (RUN_FILES), and of bench.py's results beside it."""
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    return [n for n in RUN_FILES if n in names] + \
        [n for n in names if n.startswith("bench_") and n.endswith(BENCH_FILES)]


def check_out_dir(cfg, defaults):
    """Before anything is loaded: a new run refuses an --out that holds anything of a run, unless
    --overwrite (clear_out_dir then replaces it, once everything has loaded), which in turn
    refuses an --init inside --out; --resume checks its settings against the checkpoint's.
    The refusal leads on: --resume where there is a checkpoint to resume, else --overwrite."""
    if cfg.resume:
        return check_resume(cfg, defaults)
    held = run_files(cfg.out)
    if held and not cfg.overwrite:
        ck = latest_checkpoint(cfg.out, required=False)
        step = checkpoint_step(ck) if ck else None
        if step is not None:
            say = f"checkpoint at step {step}): continue it with --resume, start over with"
        elif ck:
            say = f"its {os.path.relpath(ck, cfg.out)}/train_state.pt is damaged, so it cannot " \
                  "be resumed): start over with"
        else:
            say = "no checkpoint was saved, so it cannot be resumed): start over with"
        raise ConfigError(f"{cfg.out} already holds a run ({', '.join(held)}; {say} --overwrite, "
                          "or pick another --out")
    if cfg.overwrite and cfg.init and os.path.exists(cfg.init) and lies_inside(cfg.init, cfg.out):
        raise ConfigError(f"--init {cfg.init} lies inside --out {cfg.out}, which --overwrite "
                          "clears: copy the init elsewhere first, or pick another --out")


def clear_out_dir(cfg):
    """--overwrite: remove the earlier run's files and bench.py's results for its checkpoint
    (only once the new run has loaded), and say so."""
    held = run_files(cfg.out)
    for name in held:
        path = os.path.join(cfg.out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if held:
        print(f"--overwrite: removed {', '.join(held)} of the earlier run in {cfg.out}", flush=True)


# -----------------------------------------------------------------------------
# --resume continues a run exactly, or refuses

# Settings a resumed run may give anew: how far it runs, how often it logs and saves, where and
# how fast it computes, and how this command is run. Every other setting defines the run, and
# --resume refuses a change to it. (--minutes: a resumed run keeps the first run's plan, below.)
RESUMABLE = {"steps", "log_every", "save_every", "threads", "device", "compile", "attention",
             "grad_ckpt", "out", "resume", "overwrite", "plan", "minutes"}

# What a checkpoint written before these settings existed did: check_resume compares them.
BEFORE_SAVED = {"recipe": "paper", "supervise": "all", "batching": "random"}


def same_setting(old, new):
    """Equal, or two spellings of one existing path."""
    if old == new:
        return True
    paths = isinstance(old, str) and isinstance(new, str) and old and new
    return bool(paths and os.path.exists(old) and os.path.exists(new) and os.path.samefile(old, new))


def check_resume(cfg, defaults):
    """--resume continues a run exactly: every setting that defines it as the checkpoint's (a
    field missing from an older checkpoint had its default: `defaults`, TrainConfig's as a
    dict), or an error listing each change."""
    ck = latest_checkpoint(cfg.out)
    state = saved_state(ck)
    saved, fsdp = state["args"], state.get("fsdp", False)
    del state
    if fsdp != cfg.fsdp:
        flag = "with" if fsdp else "without"
        raise ConfigError(f"{ck} was written {flag} --fsdp (its optimizer state is laid out for "
                          f"that): resume it {flag} --fsdp")
    planned = saved.get("planned_steps", saved["steps"])
    if saved.get("minutes") and (cfg.steps, cfg.cooldown) != (planned, saved["cooldown"]):
        raise ConfigError(f"{ck} is from a --minutes run planned to {planned} steps with a "
                          f"{saved['cooldown']}-step cool-down: resume it with --steps {planned} "
                          f"--cooldown {saved['cooldown']}")
    old = {**defaults, **BEFORE_SAVED, **saved}
    changed = [f"{option(name)} {old[name]!r} -> {new!r}" for name, new in asdict(cfg).items()
               if name not in RESUMABLE and not same_setting(old[name], new)]
    if changed:
        raise ConfigError(f"{ck} was trained with other settings, and --resume continues a run "
                          f"exactly: {', '.join(changed)}. Pass the saved ones (args.json), or "
                          "start a new run (another --out, or --overwrite)")


def resume(cfg, rng, stream, device, master, tok):
    """--resume (its settings checked by check_resume): (the student from the last checkpoint's
    weights, its step, its optimizer state); the data position and both RNG states are restored
    in place. train_state.pt is read into memory: the next save deletes it, and a memory-mapped
    copy would keep it on disk for the whole run. Under FSDP every rank maps it (the page cache
    holds one copy for all) and keeps copies of its own shard only (load_optimizer_state).
    The log is cut back to the checkpoint later, once everything has loaded (truncate_log)."""
    ck = latest_checkpoint(cfg.out)
    state = saved_state(ck, mmap=cfg.fsdp)
    stream.pos = state["data_pos"]
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    try:
        student = from_pretrained(ck, device=torch.device("cpu") if cfg.fsdp else device)
    except CheckpointError as e:
        raise TrainingError(f"{e}; so the run in {cfg.out} cannot be resumed: start it over with "
                            "--overwrite") from None
    check_vocab(tok, student.cfg, ck)
    if master:
        print(f"resumed {ck} at step {state['step']}", flush=True)
    return student, state["step"], state["optimizer"]


def load_optimizer_state(raw, opt, optim_state, cfg):
    """A resumed run's AdamW state, which must fit the weights saved beside it."""
    try:
        if cfg.fsdp:                    # each rank takes its shard of the full state
            from parallel.distributed import load_sharded_optimizer_state
            load_sharded_optimizer_state(raw, opt, optim_state)
        else:
            opt.load_state_dict(optim_state)     # it checks the counts of tensors, not shapes
            for p in raw.parameters():
                for t in opt.state[p].values():
                    if torch.is_tensor(t) and t.dim() and t.shape != p.shape:
                        raise ValueError(f"state of shape {tuple(t.shape)} for a parameter of "
                                         f"shape {tuple(p.shape)}")
    except (ValueError, KeyError, RuntimeError) as e:
        ck = latest_checkpoint(cfg.out)
        raise TrainingError(f"{ck}/train_state.pt does not fit the weights beside it ({e}): they "
                            "are not of one run, so it cannot be resumed; "
                            + WEIGHTS_ONLY.format(ck=ck)) from None


def truncate_log(path, step):
    """On resume, forget the records of steps after the checkpoint: they are about to be redone.
    What a kill or a full disk leaves (a last line cut short) and what has no place in the log
    (blank lines, records without a step) is dropped too, in one warning line; a line that is
    not JSON before the last one is damage of another kind, named with its line."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines[-1] == b"":                    # the newline that ends the file
        lines.pop()
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    keep, blank, stepless, cut = [], 0, [], False
    for n, line in enumerate(lines):
        if not line.strip():
            blank += 1
            continue
        try:
            rec = json.loads(line)
        except ValueError:                  # not JSON (nor UTF-8)
            if n == last:
                cut = True
                continue
            raise TrainingError(f"{path}:{n + 1} is not a JSON record, so --resume cannot tell "
                                "which steps it logged: delete or correct that line, then "
                                "--resume again") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            stepless.append(n + 1)
        elif rec["step"] <= step:
            keep.append(line.decode() + "\n")
    dropped = [f"{blank} blank line{'s' * (blank > 1)}"] * (blank > 0)
    if stepless:
        dropped.append(f"{len(stepless)} record{'s' * (len(stepless) > 1)} without a step "
                       f"(line {', '.join(map(str, stepless[:5]))}{' ...' * (len(stepless) > 5)})")
    if cut:
        dropped.append(f"its last line, cut short (line {last + 1})")
    if dropped:
        warn(f"{path}: dropped {' and '.join(dropped)}; the {len(keep)} records up to step "
             f"{step} are kept")
    try:                                # a new file swapped in whole: a full disk keeps the old
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + ".tmp")


# -----------------------------------------------------------------------------
# Checkpoints, swapped in whole, and read back with damage named


def save_checkpoint(out, student, tok, state):
    """Write ckpt.tmp/ in full, then swap it in for ckpt/: a kill never leaves a half checkpoint,
    nor does a failed write (a full disk), whose ckpt.tmp/ is removed again (Ctrl-C's too).
    state: train_state.pt's contents (the optimizer's state, step, data position, RNG states)."""
    tmp, final, old = (os.path.join(out, n) for n in ("ckpt.tmp", "ckpt", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(student, tmp)
        tok.save(tmp)
        torch.save(state, os.path.join(tmp, "train_state.pt"))
    except BaseException as e:          # torch.save and safetensors raise their own types
        # in words while ckpt.tmp still fills the disk (write_problem); None: Ctrl-C
        problem = write_problem(e, out) if isinstance(e, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if problem is None:             # Ctrl-C
            raise
        raise TrainingError(f"saving the checkpoint of step {state['step']} failed, the last one "
                            f"saved is untouched: {problem}") from None
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out, required=True):
    """The checkpoint to resume: ckpt/, or ckpt.old/ (killed between the two renames above)."""
    for name in ("ckpt", "ckpt.old"):
        if os.path.isfile(os.path.join(out, name, "train_state.pt")):
            return os.path.join(out, name)
    if not required:
        return None
    held = run_files(out)
    if not held:
        raise ConfigError(f"--resume: no checkpoint in {out}, nor anything else of a run; start "
                          "a new run without --resume")
    if os.path.isfile(os.path.join(out, "ckpt", "config.json")):
        ck = os.path.join(out, "ckpt")
        raise ConfigError(f"--resume: {ck} has no train_state.pt, so it cannot be resumed; "
                          + WEIGHTS_ONLY.format(ck=ck))
    raise ConfigError(f"--resume: the run in {out} saved no checkpoint (it holds "
                      f"{', '.join(held)}), so it cannot be resumed: start it over with --overwrite")


# What a run whose train_state.pt is lost can still do (ck: its checkpoint)
WEIGHTS_ONLY = ("start it over with --overwrite, or train its weights on in a new run: "
                "--init {ck} --reuse-mtp --out ANOTHER_DIR")
STATE_KEYS = ("optimizer", "step", "data_pos", "rng", "torch_rng", "args")


def saved_state(ck, mmap=True):
    """A checkpoint's train_state.pt; memory-mapped by default: reading its step or args reads
    little. One that cannot be read (cut short, empty, overwritten) raises TrainingError, which
    names it and what can be done."""
    path = os.path.join(ck, "train_state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except OSError as e:
        raise TrainingError(f"cannot read {path}: {os_problem(e)}") from None
    except Exception as e:              # torch.load and pickle: many types, all "damaged"
        size = os.path.getsize(path)
        state = "empty" if size == 0 else \
            f"{size} bytes that torch.load cannot read: {type(e).__name__}"
    if not isinstance(state, dict) or not all(key in state for key in STATE_KEYS) or \
            not isinstance(state["args"], dict) or "steps" not in state["args"]:
        why = state if isinstance(state, str) else "not a training state of distill.py"
        raise TrainingError(f"{path} is damaged ({why}), so the run in {os.path.dirname(ck)} "
                            f"cannot be resumed; " + WEIGHTS_ONLY.format(ck=ck))
    return state


def planned_total(out):
    """The step count that the run in `out` ran to when it saved its last checkpoint."""
    args = saved_state(latest_checkpoint(out))["args"]
    return args.get("planned_steps", args["steps"])


def checkpoint_step(ck):
    """The step of checkpoint `ck`, or None when its train_state.pt is damaged."""
    try:
        return saved_state(ck)["step"]
    except TrainingError:
        return None


def save_run(cfg, raw, opt, tok, log, step, total, stream, rng, world, master):
    """Checkpoint (every rank calls this: DDP compares the ranks' weights, FSDP gathers them)."""
    same, student, optim = None, raw, None
    if cfg.fsdp:
        from parallel.distributed import gather_for_saving
        student, optim = gather_for_saving(raw, opt)
    else:
        if world > 1:
            from parallel.distributed import ranks_identical
            same = ranks_identical(raw, world)
            if not same:
                raise TrainingError("the DDP ranks hold different weights: a bug, or a rank that "
                                    "resumed another checkpoint; start over with --overwrite")
        optim = opt.state_dict()
    if master:
        save_checkpoint(cfg.out, student, tok, {
            "optimizer": optim, "fsdp": cfg.fsdp, "step": step, "data_pos": stream.pos,
            "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
            "args": {**asdict(cfg), "planned_steps": total}})
        rec = {"step": step, "saved": os.path.join(cfg.out, "ckpt"), "world": world}
        rec.update({"fsdp": True} if cfg.fsdp else {"ranks_identical": True if world == 1 else same})
        log.write(json.dumps(rec) + "\n")
        log.flush()


# -----------------------------------------------------------------------------
# A diverged run stops; its last good checkpoint and a valid log stay


class Diverged(ArithmeticError):
    """A step whose loss or gradient norm is not finite (train() says which step)."""

    def __init__(self, loss, norm):
        super().__init__(f"the loss is {loss:g} and the gradient norm {norm:g}")


def kept(out):
    """What of the run in `out` a stopped run keeps, in words, and the step it can be resumed
    from (None: none)."""
    ck = latest_checkpoint(out, required=False)
    step = checkpoint_step(ck) if ck else None
    if step is not None:
        return f"{ck} keeps step {step}", step
    return (f"{ck}/train_state.pt is damaged" if ck else "no checkpoint was saved yet"), None


def diverged(cfg, step, e):
    """The one line that stops a diverged run: the step, the likely cause, what is kept."""
    return (f"step {step} diverged: {e}. Most likely the learning rate is too high for this model "
            f"(--lr {cfg.lr:g}{', no --grad-clip' if not cfg.grad_clip else ''}); "
            f"{kept(cfg.out)[0]}. Start over with a lower --lr (--overwrite)")


def stopped(cfg, step=None, total=None):
    """The one line of a run stopped by Ctrl-C (exit code 130): where, what is kept, what next.
    step: the steps it had done (None: it stopped before its loop began)."""
    where = f"after {step} of {total} steps" if step is not None else "before its first step"
    if step is None and not run_files(cfg.out):
        return f"stopped (Ctrl-C) {where}: nothing was written in {cfg.out}"
    what, resumable = kept(cfg.out)
    then = "start it over with --overwrite" if resumable is None else "continue it with --resume"
    return f"stopped (Ctrl-C) {where}; {what}: {then}"


# -----------------------------------------------------------------------------
# --minutes: the run's length, planned once; args.json


def plan_steps(done, loop_s, minutes, most, warmup, cooldown):
    """--minutes: the run's length, planned once from the pace of its first `done` steps, which
    took `loop_s` seconds (their first calls' overheads included, so the estimate errs short).
    At most `most`; at least enough that the cool-down starts after the steps already done
    (their lr was made with no cool-down in sight) and after the whole warm-up (so that the
    run's schedule is never fitted into a shorter one, distill.fit_schedule), even if that
    overruns the budget."""
    left = 60 * minutes - loop_s
    return max(max(done, warmup) + cooldown, min(most, done + int(left / (loop_s / done))))


def plan_length(cfg, step, loop_s, world, device, log):
    """--minutes: the run's length, planned once (plan_steps) from the pace of its first steps
    (the slowest rank's, so that every rank plans the same); to stdout, the log and args.json."""
    if world > 1:
        t = torch.tensor([loop_s], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        loop_s = t.item()
    total = plan_steps(step, loop_s, cfg.minutes, cfg.steps, cfg.warmup, cfg.cooldown)
    if log is not None:
        print(f"--minutes {cfg.minutes:g}: {step} steps took {loop_s:.1f} s, so {total} steps in "
              f"all (--steps {cfg.steps})", flush=True)
        log.write(json.dumps({"step": step, "planned_steps": total, "loop_s": round(loop_s, 2)}) + "\n")
        log.flush()
        write_args(cfg, total)
    return total


def write_args(cfg, total):
    """The run's settings, and the step count it runs to, in OUT/args.json."""
    with open(os.path.join(cfg.out, "args.json"), "w") as f:
        json.dump({**asdict(cfg), "planned_steps": total}, f, indent=1)


def schedule_change(step, old, new):
    """--resume at `step` with another --steps: the line that says how the lr of the steps still
    to run changes; old, new: (steps, warm-up, cool-down) of the run as saved and as resumed,
    warm-up and cool-down as distill.fit_schedule fits them (None: no change, with no cool-down
    and the same warm-up). The lr schedule is a function of the run's length (distill.lr_at)."""
    (t0, w0, c0), (t1, w1, c1) = old, new
    if t1 in (t0, step) or step > t1 or (c1 == 0 and w0 == w1):
        return None
    what = [f"its cool-down now covers steps {t1 - c1 + 1}-{t1} (was {t0 - c0 + 1}-{t0})"] if c1 else []
    what += [f"its warm-up is {w1} steps (was {w0})"] if w1 != w0 else []
    return (f"--steps {t0} -> {t1} on --resume changes the lr of the steps still to run "
            f"({step + 1}-{t1}): {' and '.join(what)}")
