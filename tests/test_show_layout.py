"""`python -m tools.show_layout`: what it prints is read back from the text and compared with
what pack(), teacher_input() and distill.supervised_weight() give for the same sample."""
import re

import pytest
import torch

from conftest import assert_exits, tiny_model
from data import pack, sample_ids, teacher_input
from compat.tokenizers import load_tokenizer
from synthetic.problems import synthetic_problems
from tools.show_layout import SHOW_DEFAULT_TOKENIZER, main
from distill import TrainConfig, supervised_weight
from compat.hf import from_pretrained, save_pretrained

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(-?\d+)\s")                 # slot, pos, token id
SUP = re.compile(r" r(\d+) y'(\d+) w=(\d+) target (-?\d+)")
GUESS = re.compile(r"\| student guess (\S+)")
GRID = re.compile(r"^\s*(\d+) .*\|([#.]+)\|$")


def parse(text):
    """The three printed sections, read back: rows of the student table (slot, pos, id, the
    supervised fields or None, the guess or None), the mask grid, rows of the teacher table."""
    _, student, grid, teacher = re.split(r"^\d\. ", text, flags=re.M)
    rows = []
    for line in student.splitlines():
        m = ROW.match(line)
        if m:
            s, g = SUP.search(line), GUESS.search(line)
            rows.append((*map(int, m.groups()), tuple(map(int, s.groups())) if s else None,
                         g.group(1) if g else None))
    cells = [GRID.match(line) for line in grid.splitlines()]
    mask = [[c == "#" for c in m.group(2)] for m in cells if m]
    t_rows = [tuple(map(int, m.groups())) for m in map(ROW.match, teacher.splitlines()) if m]
    return rows, torch.tensor(mask), t_rows


def check(text, seq, k, offset, M, N, mtp, eos, rollout=None):
    """Every printed cell against the packer's tensors for the same sample."""
    P = pack([seq], k, offset, M, N, mtp, eos)
    weight = supervised_weight(P, TrainConfig())
    rows, mask, t_rows = parse(text)
    L = P.pos.numel()
    assert [r[0] for r in rows] == list(range(L)) and mask.shape == (L, L)
    assert torch.equal(mask, P.mask)
    assert [r[1] for r in rows] == P.pos.tolist()
    assert [r[2] for r in rows] == P.idx[0].tolist()
    shown = {r[0]: r[3] for r in rows if r[3] is not None}
    want = {int(P.sup[r, j]): (r, j + 1, int(weight[0, r, j]), int(P.targets[0, r, j]))
            for r in range(M) for j in range(k)}
    assert shown == want
    if rollout is None:                       # placeholders y'j are printed as ids -j
        rollout = -torch.arange(1, k + 1).expand(1, M, k)
    t_idx = teacher_input(P, rollout)
    assert [r[1] for r in t_rows] == P.pos.tolist()                 # same positions
    assert [r[2] for r in t_rows] == t_idx[0].tolist()
    return P, rows


@pytest.mark.parametrize("args", [
    [],                                                                 # the defaults
    ["--k", "4", "--regions", "3", "--seq-len", "24", "--offset", "5", "--problem", "7"],
    ["--k", "2", "--regions", "4", "--seq-len", "20", "--offset", "0"],
    ["--k", "3", "--regions", "3", "--seq-len", "15", "--offset", "1", "--text", "Q: 2 + 3?\nA: 5"],
])
def test_printed_layout_is_packs(args, capsys):
    main([*args])
    text = capsys.readouterr().out
    opt = dict(zip(args[::2], args[1::2]))
    k, M, N = int(opt.get("--k", 3)), int(opt.get("--regions", 2)), int(opt.get("--seq-len", 16))
    tok = load_tokenizer(SHOW_DEFAULT_TOKENIZER)
    if "--text" in opt:
        seq = tok.encode(opt["--text"]) + [tok.eos_id]
    else:
        n = int(opt.get("--problem", 0))
        seq = sample_ids(tok, synthetic_problems(n + 1, seed=0)[n])
    P, _ = check(text, seq, k, int(opt.get("--offset", 3)), M, N, tok.n_vocab, tok.eos_id)
    if "--text" in opt:           # the short text: its last region reaches the EOS padding
        assert P.past_eos.any() and "<EOS>" in text


def test_rollout_of_a_student_fills_the_teacher_input(tiny_init, capsys):
    """--student: the teacher's slots hold that model's argmax, computed here with a plain forward
    over every packed slot (no out_idx), <MTP> left out as an output."""
    main(["--student", tiny_init, "--k", "4", "--seq-len", "24", "--offset", "2"])
    text = capsys.readouterr().out
    tok = load_tokenizer(tiny_init)
    model = from_pretrained(tiny_init).eval()
    mtp = model.add_mtp_token()                                # as --student does for a plain init
    seq = sample_ids(tok, synthetic_problems(1, seed=0)[0])
    P = pack([seq], 4, 2, 2, 24, mtp, tok.eos_id)
    with torch.no_grad():
        logits = model(P.idx, pos=P.pos, mask=P.mask)[0]      # (L, V+1)
    logits[:, mtp] = -torch.inf
    rollout = logits.argmax(-1)[P.sup][None]                  # (1, M, k)
    _, rows = check(text, seq, 4, 2, 2, 24, mtp, tok.eos_id, rollout)
    guesses = [r[4] for r in rows if r[4] is not None]
    assert len(guesses) == 2 * 4 and "placeholders" not in text


def test_bad_options_are_messages(tmp_path, capsys, monkeypatch):
    def fails(args, message):
        assert_exits(main, args, message, capsys)

    def no_building(n, seed=0):           # --problem 99999999 would build 10^8 problems first
        raise AssertionError(f"{n} problems built before --problem was checked")
    with monkeypatch.context() as m:
        m.setattr("tools.show_layout.synthetic_problems", no_building)
        fails(["--problem", "99999999"], "--problem must be a synthetic training problem, 0 to 49999")

    fails(["--offset", "8"], "offset must be in [0, 8)")
    fails(["--k", "9"], "too short")
    fails(["--k", "0"], "must be >= 1")
    fails(["--seq-len", "200"], "<= 100")
    fails(["--text", ""], "--text is empty")
    fails(["--problem", "-1"], "0 to 49999 (got -1)")
    fails(["--tokenizer", str(tmp_path / "none")], "not 'gpt2', a file")
    fails(["--student", str(tmp_path)], "--student:")
    fails(["--text", "x", "--problem", "2"], "not allowed with")
    small = tmp_path / "small"                     # a student with a 61-token vocabulary
    save_pretrained(tiny_model(), small)
    fails(["--student", str(small), "--tokenizer", SHOW_DEFAULT_TOKENIZER],
          "use the student's own tokenizer")
