"""
The teacher's own answers: decode every question of a training set with a checkpoint (k=1,
greedy unless --temperature) and write a question/answer .jsonl that distill.py --data reads as
it is. Distilled on these, the <MTP> slots learn to continue the text the model itself writes,
which is what they continue when it decodes (docs/METHOD.md, "Which answers to train on").

    python -m tools.own_answers --ckpt checkpoints/synth-teacher --data synthetic --limit 12800 \
        --out runs/own/synthetic.jsonl --batch 250
    python -m tools.own_answers --ckpt checkpoints/smollm2-135m-instruct --data gsm8k \
        --limit 600 --out runs/own/gsm8k.jsonl --batch 50
    python distill.py --init checkpoints/smollm2-135m-instruct --data runs/own/gsm8k.jsonl ...

Each question is asked as a training sample starts (data.sample_ids: the chat format if the
tokenizer has one, else "Q: ...\\nA:"), and its answer is what the model writes until its stop
token or the next "Q:". Rows are written in order, a batch at a time, beside OUT.json (the
settings): a killed run continues where it stopped (the same command), and its file is the one
an uninterrupted run writes (question i draws from row_seed(--seed, i) when sampling).
"""
import argparse
import json
import os
import sys
import time

from compat.tokenizers import TokenizerError, check_vocab, load_tokenizer
from bench import cut_answer, new_question
from data import DataError, load_dataset, prompt_ids
from decode import (DecodeError, Static, add_sampling_args, check_output_path, load_for_decoding,
                    resolve_device, row_seed)
from fast.batch import generate_batch
from model import CheckpointError


def answer_text(tok, out):
    """The text of one output, without its stop token, cut where the model starts a new
    question (bench.cut_answer), without the space data.sample_ids puts back between prompt and
    answer."""
    if out and out[-1] in tok.stop_ids:
        out = out[:-1]
    return cut_answer(tok.decode(out)).strip()


def done_rows(path, questions):
    """How many rows of `path` are complete and answer questions[0], [1], ... in order; a row cut
    short by a kill (the last, without its newline) is dropped from the file."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]           # the complete lines: each ends in a newline
    good = 0
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or good >= len(questions) or row.get("question") != questions[good]:
            raise DataError(f"{path}:{good + 1} is not the answer to question {good + 1} of --data: "
                            "pick another --out, or delete it to start over")
        good += 1
    with open(path, "r+b") as f:        # keep the complete rows only
        f.truncate(sum(len(line) + 1 for line in lines))
    return good


def check_settings(a, out):
    """OUT.json holds the settings a run of OUT was started with; a continued run must have them."""
    meta = os.path.splitext(out)[0] + ".json"
    keep = {k: getattr(a, k) for k in ("ckpt", "data", "limit", "max_new", "temperature", "top_k",
                                       "top_p", "seed", "dtype")}
    if os.path.isfile(meta) and os.path.isfile(out):
        try:
            with open(meta) as f:
                saved = dict(json.load(f))
        except (ValueError, TypeError):
            raise DataError(f"{meta} (the settings of {out}) is damaged: delete both to start "
                            "over") from None
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in keep.items()
                   if saved.get(k) != v]
        if changed:
            raise DataError(f"{out} was started with other settings ({', '.join(changed)}): give "
                            "the same ones to continue it, or another --out")
    with open(meta, "w") as f:
        json.dump(keep, f, indent=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Write a checkpoint's own answers to a question set")
    p.add_argument("--ckpt", required=True, help="the model that answers (the teacher)")
    p.add_argument("--data", default="synthetic", help="synthetic | gsm8k | a .jsonl (its train split)")
    p.add_argument("--limit", type=int, default=None, help="the first this many questions")
    p.add_argument("--out", required=True, help="the .jsonl to write (OUT.json beside it)")
    p.add_argument("--batch", type=int, default=64, help="questions decoded together")
    p.add_argument("--max-new", type=int, default=256, help="most tokens per answer")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    add_sampling_args(p, "sampling seed: question i draws from row_seed(seed, i)")
    return p.parse_args(argv)


def load(a):
    """(model, tokenizer, questions, how many are written already), everything checked."""
    if not a.out.endswith(".jsonl"):
        raise DataError(f"--out {a.out} must end in .jsonl (distill.py --data reads it by that)")
    if a.batch < 1 or a.max_new < 1 or (a.limit is not None and a.limit < 1):
        raise DataError("--batch, --max-new and --limit must be >= 1")
    check_output_path(a.out, "--out")
    model = load_for_decoding(a.ckpt, resolve_device(a.device), a.dtype)
    tok = load_tokenizer(a.ckpt)
    check_vocab(tok, model.cfg, a.ckpt)
    rows = load_dataset(a.data, "train", a.limit)
    if not rows:
        raise DataError(f"--data {a.data} has no questions")
    questions = [r["question"] for r in rows]
    longest = max(len(prompt_ids(tok, q)) for q in questions)
    if longest >= model.cfg.max_seq_len:
        raise DataError(f"a question takes {longest} tokens, the model's context is "
                        f"{model.cfg.max_seq_len}: leave it out of --data")
    check_settings(a, a.out)
    return model, tok, questions, done_rows(a.out, questions)


def write_answers(a, model, tok, questions, start):
    """Decode questions[start:], --batch at a time, each batch's rows appended to --out (and
    synced) before the next; returns how many answers ran to --max-new without a stop."""
    sampling = {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p} \
        if a.temperature else {}
    n, t0, unstopped = len(questions), time.perf_counter(), 0
    with open(a.out, "a", encoding="utf-8") as f:
        for i in range(start, n, a.batch):
            batch = questions[i:i + a.batch]
            prompts = [prompt_ids(tok, q) for q in batch]
            room = model.cfg.max_seq_len - max(len(p) for p in prompts)
            outs, st = generate_batch(model, prompts, Static(1), max_new_tokens=min(a.max_new, room),
                                      stop_ids=tok.stop_ids, stop_fn=new_question(tok),
                                      seed=[row_seed(a.seed, i + j) for j in range(len(batch))],
                                      **sampling)
            unstopped += sum(not r["stopped"] and "Q:" not in tok.decode(o)
                             for r, o in zip(st["rows"], outs))
            f.write("".join(json.dumps({"question": q, "answer": answer_text(tok, o)}) + "\n"
                            for q, o in zip(batch, outs)))
            f.flush()
            os.fsync(f.fileno())
            done, dt = i + len(batch), time.perf_counter() - t0
            eta = dt / (done - start) * (n - done)
            print(f"{done}/{n} answers | {(done - start) / dt:.1f} answers/s | "
                  f"ETA {int(eta // 60)}:{int(eta % 60):02d}", flush=True)
    return unstopped


def main(argv=None):
    a = parse_args(argv)
    try:
        model, tok, questions, start = load(a)
    except (DataError, DecodeError, CheckpointError, TokenizerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    n, t0 = len(questions), time.perf_counter()
    if start:
        print(f"{a.out}: {start} of {n} answers written already; continuing", flush=True)
    try:
        unstopped = write_answers(a, model, tok, questions, start)
    except KeyboardInterrupt:
        print(f"stopped (Ctrl-C): {a.out} keeps every answer written so far; the same command "
              "continues it", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        print(f"error: could not write {a.out} ({e.strerror or e}): it keeps every answer written "
              "so far; the same command continues it", file=sys.stderr)
        sys.exit(2)
    if unstopped:
        print(f"warning: {unstopped} answers of this run reached --max-new {a.max_new} (or the "
              "context) without a stop token; they are written as far as they went", flush=True)
    print(f"wrote {a.out}: {n} question/answer rows ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
