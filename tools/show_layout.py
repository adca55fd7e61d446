"""
Print the packed MTP training layout of one sample: the student's input slot by slot (position
ids, supervised slots, their weights and targets), the attention mask as a grid, then the
teacher's input. Every cell comes from the functions distill.py trains with (data.pack,
data.teacher_input, distill.supervised_weight).

    python -m tools.show_layout                               # k=3, 2 regions, 16 tokens
    python -m tools.show_layout --k 4 --regions 3 --seq-len 24 --offset 5 --problem 7
    python -m tools.show_layout --text "Q: 2 + 3?\nA: 5"       # a short text: EOS padding
    python -m tools.show_layout --student runs/mtp-synth/ckpt  # the rollout of a real student
"""
import argparse
import sys

import torch

from data import DataError, pack, region_ends, sample_ids, teacher_input

from compat.tokenizers import load_tokenizer, TokenizerError
from distill import TrainConfig, supervised_weight
from synthetic.problems import SYNTHETIC_TRAIN, synthetic_problems
from synthetic.teacher import DEFAULT_TEACHER
from compat.hf import from_pretrained

SHOW_DEFAULT_TOKENIZER = DEFAULT_TEACHER


def token_label(tok, i, mtp_id):
    """A token as printable ASCII: <MTP>, <EOS>, or the repr of its text."""
    if i == mtp_id:
        return "<MTP>"
    if i == tok.eos_id:
        return "<EOS>"
    return ascii(tok.decode([i]))


def student_rollout(student, P):
    """(B, M, k) the student's argmax at every supervised position, <MTP> never an output
    (what distill.mtp_step computes before the teacher pass)."""
    B, (M, k) = P.idx.size(0), P.sup.shape
    with torch.no_grad():
        logits = student(P.idx, pos=P.pos, mask=P.mask, out_idx=P.sup.reshape(1, M * k).expand(B, -1))
    logits[..., student.cfg.mtp_token_id] = -torch.inf
    return logits.argmax(-1).view(B, M, k)


def mask_grid(mask, labels):
    """An (L, L) attention mask as lines of text: a row per query slot (its number and label),
    '#' in the column of each key slot it may attend, '.' elsewhere; two lines number the columns."""
    L = mask.size(0)
    head = [" " * 20 + "".join(str(c // 10) if c >= 10 else " " for c in range(L)),
            " " * 20 + "".join(str(c % 10) for c in range(L))]
    return head + [f"{q:>4} {labels[q]:<14} |{''.join('#' if m else '.' for m in row)}|"
                   for q, row in enumerate(mask.tolist())]


def show_layout(tok, seq, k, offset, n_regions, seq_len, mtp_id, student=None):
    """The packed layout of one sample as text: the student's input, its attention mask as a
    grid ('#' = the row's query slot may attend the column's key slot), and the teacher's input.
    Without a student the rollout is placeholders y'1..y'k (ids -1..-k, never real tokens)."""
    P = pack([seq], k, offset, n_regions, seq_len, mtp_id, tok.eos_id)
    weight = supervised_weight(P, TrainConfig(k=max(k, 2), seq_len=seq_len, regions=n_regions))
    ends = region_ends(seq_len, n_regions, offset)
    L = P.pos.numel()
    # what each supervised slot is: (region r, j): its logits predict y'_j
    sup_of = {int(P.sup[r, j]): (r, j) for r in range(n_regions) for j in range(k)}
    mask_of = {int(P.sup[r, j]): r for r in range(n_regions) for j in range(1, k)}
    if student is None:
        rollout = -torch.arange(1, k + 1).expand(1, n_regions, k)          # y'1..y'k
    else:
        rollout = student_rollout(student, P)
    t_idx = teacher_input(P, rollout)

    def label(i):
        return f"y'{-i}" if i < 0 else token_label(tok, i, mtp_id)

    idx = P.idx[0].tolist()
    lines = [f"Packed layout: k={k}, {n_regions} regions in {seq_len} ground-truth tokens, "
             f"offset {offset}: prefixes end at x_p, p = {', '.join(map(str, ends))}",
             f"{L} packed slots = {seq_len} ground-truth tokens + {n_regions} x {k - 1} <MTP> "
             f"(id {mtp_id}); the sample: {len(seq)} tokens, " +
             (f"cut at {seq_len} (no EOS in the window)" if len(seq) > seq_len else
              f"EOS at x_{len(seq) - 1}" + (", then EOS padding" if len(seq) < seq_len else "")),
             "", "1. The student's input (data.pack). pos = position id. A supervised slot of "
             "region r predicts", "   y'j with weight w (distill.supervised_weight) and "
             "ground-truth target x_(p+j) (P.targets;", "   --teacher hard trains toward the "
             "teacher's argmax there instead, -1 = past the window).", "",
             f"slot  pos     id  {'token':<12}  {'kind':<9}  supervised"]
    for s in range(L):
        kind = f"r{mask_of[s]} mask" if s in mask_of else "truth"
        row = f"{s:>4}  {int(P.pos[s]):>3}  {idx[s]:>5}  {label(idx[s]):<12}  {kind:<9}"
        if s in sup_of:
            r, j = sup_of[s]
            t = int(P.targets[0, r, j])
            row += f"  r{r} y'{j + 1} w={float(weight[0, r, j]):.0f} target {t}"
            row += f" {label(t)}" if t >= 0 else ""
            if student is not None:
                row += f" | student guess {label(int(rollout[0, r, j]))}"
        lines.append(row.rstrip())
    lines += ["", "2. The attention mask (P.mask): row = query slot, column = key slot, "
              "'#' = may attend.", "   Ground truth sees earlier ground truth only; a mask sees "
              "its prefix and its own span.", ""]
    lines += mask_grid(P.mask, [label(i) for i in idx])
    lines += ["", "3. The teacher's input (data.teacher_input) after the student's rollout "
              + ("(the student guesses above)" if student is not None
                 else "(placeholders y'j: no model)") + ":",
              "   each region's masks hold the student's y'1..y'(k-1); same pos, same mask "
              "(mtp_step passes P.mask).", "   The teacher's logits at a supervised slot score "
              "the student's next token y'j.", "", f"slot  pos     id  {'token':<12}  scores"]
    t_list = t_idx[0].tolist()
    for s in range(L):
        row = f"{s:>4}  {int(P.pos[s]):>3}  {t_list[s]:>5}  {label(t_list[s]):<12}"
        if s in sup_of:
            r, j = sup_of[s]
            row += f"  r{r} y'{j + 1}"
        lines.append(row.rstrip())
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the packed MTP training layout of one sample",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--k", type=int, default=3, help="tokens per region: x_p and k-1 <MTP>")
    p.add_argument("--regions", type=int, default=2, help="MTP regions in the sequence (M)")
    p.add_argument("--offset", type=int, default=3, help="where the first region's prefix ends")
    p.add_argument("--seq-len", type=int, default=16, help="ground-truth tokens shown (N)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--problem", type=int, default=0, help="this synthetic training problem")
    src.add_argument("--text", help="this text instead (EOS appended)")
    p.add_argument("--tokenizer", default=None, help="tokenizer: a checkpoint dir, 'gpt2' or a "
                   "file (default: --student's, else the embedded teacher's)")
    p.add_argument("--student", help="take the rollout from this checkpoint's argmax (one "
                   "without <MTP> gets it added, as at step 0); default: placeholders")
    a = p.parse_args(argv)
    try:
        if a.k < 1 or a.regions < 1 or a.seq_len < 1:
            raise DataError("--k, --regions and --seq-len must be >= 1")
        if a.seq_len + a.regions * (a.k - 1) > 100:
            raise DataError("the grid prints one character per packed slot: keep --seq-len + "
                            "--regions * (k - 1) <= 100")
        if not 0 <= a.problem < SYNTHETIC_TRAIN:
            raise DataError(f"--problem must be a synthetic training problem, 0 to "
                            f"{SYNTHETIC_TRAIN - 1} (got {a.problem})")
        if a.text is not None and not a.text:
            raise DataError("--text is empty: give some text")
        student = None
        if a.student:
            from model import CheckpointError
            try:
                student = from_pretrained(a.student).eval()
            except (CheckpointError, FileNotFoundError) as e:
                raise DataError(f"--student: {e}") from None
            if student.cfg.mtp_token_id is None:
                student.add_mtp_token()
        tok = load_tokenizer(a.tokenizer or a.student or SHOW_DEFAULT_TOKENIZER)
        mtp_id = student.cfg.mtp_token_id if student is not None else tok.n_vocab
        if a.text is not None:
            seq = tok.encode(a.text) + [tok.eos_id]
        else:
            seq = sample_ids(tok, synthetic_problems(a.problem + 1, seed=0)[a.problem])
        if max(seq) >= mtp_id:
            raise DataError(f"the tokenizer gives ids up to {max(seq)}, but the student's <MTP> "
                            f"is id {mtp_id}: use the student's own tokenizer (drop --tokenizer)")
        print(show_layout(tok, seq, a.k, a.offset, a.regions, a.seq_len, mtp_id, student))
    except (DataError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
