"""
The data side of the method: the MTP packer (many k-token problems in one training sequence,
and the teacher's view of them), the prompt and sample of a question/answer row, datasets.

    from data import load_dataset, pack, teacher_input
    batch = pack(seqs, k=4, offset=3, n_regions=5, seq_len=160, mtp_id=..., eos_id=...)
    rows = load_dataset("gsm8k", "train")        # [{"question", "answer"}], local file or download
    rows = load_dataset("synthetic", "train")    # built-in grade-school math (synthetic/)

`python -m tools.show_layout` prints the packed layout of one sample, slot by slot, from the
functions below. Tokenizers (all through tiktoken) are in compat/tokenizers.py; the synthetic
problems and their tokenizer in synthetic/; bench.py reads the answers' numbers.
"""
import json
import os
from dataclasses import dataclass

import torch

from compat.hub import cache_dir, download
from synthetic.problems import SYNTHETIC_TEST_SEED, SYNTHETIC_TRAIN, synthetic_problems


class DataError(ValueError):
    """A dataset that cannot be read; the message names the file, the line and the fix."""


# -----------------------------------------------------------------------------
# Packing many MTP problems into one training sequence (docs/METHOD.md, "Packing")

@dataclass
class Packed:
    """One packed batch. L = seq_len + n_regions * (k - 1) packed positions.

    idx     (B, L)  student input: ground truth with k-1 <MTP> after each region's prefix end
    pos     (L,)    position ids: ground truth keeps its own, the j-th mask after x_p gets p + j
    mask    (L, L)  True = query may attend key (the same layout for every row)
    gt      (N,)    packed indices of the ground-truth tokens
    sup     (M, k)  packed indices of each region's supervised positions: x_p, then its masks
    length  (B,)    ground-truth tokens of each row in the window, its EOS included
    valid   (B, M)  the region exists in this row (its prefix ends before the row's EOS)
    targets (B, M, k) ground-truth next tokens, read from the whole sample (the last region's
                    targets may lie past the N-token window), EOS past the sample's EOS, -1
                    where unknown (a sample cut without an EOS, past its last token)
    past_eos (B, M, k) the target lies past the sample's EOS (its target is EOS in every mode)
    """
    idx: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    gt: torch.Tensor
    sup: torch.Tensor
    length: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor
    past_eos: torch.Tensor

    def to(self, device):
        return Packed(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def region_ends(seq_len, n_regions, offset):
    """Ground-truth index p_r of each region's last prefix token: evenly spaced, shifted by offset."""
    stride = seq_len // n_regions
    if not 0 <= offset < stride:
        raise ValueError(f"offset must be in [0, {stride}) for {n_regions} regions in {seq_len} tokens")
    return [offset + r * stride for r in range(n_regions)]


def pack_layout(seq_len, k, ends):
    """The row-independent part of packing: where everything goes, positions, attention mask."""
    gt_slot, span_of, j_of, gt_of = [], [], [], []   # per packed position
    sup = []
    end_to_region = {p: r for r, p in enumerate(ends)}
    for i in range(seq_len):
        gt_slot.append(len(span_of))
        span_of.append(-1), j_of.append(0), gt_of.append(i)
        if i in end_to_region:
            r = end_to_region[i]
            sup.append([len(span_of) - 1] + list(range(len(span_of), len(span_of) + k - 1)))
            for j in range(1, k):
                span_of.append(r), j_of.append(j), gt_of.append(i)
    span, j, gt = torch.tensor(span_of), torch.tensor(j_of), torch.tensor(gt_of)
    pos = gt + j                                            # (L,)
    is_gt = span < 0
    # ground truth attends to earlier ground truth; a mask also sees its own span's earlier masks
    see_gt = is_gt[None, :] & (gt[None, :] <= gt[:, None])
    see_span = (span[:, None] >= 0) & (span[None, :] == span[:, None]) & (j[None, :] <= j[:, None])
    return torch.tensor(gt_slot), pos, see_gt | see_span, torch.tensor(sup)


def pack(seqs, k, offset, n_regions, seq_len, mtp_id, eos_id, starts=None):
    """Pack token sequences (each ending in EOS, or cut at seq_len) into the student layout.

    Rows longer than seq_len are cut; shorter ones are padded with EOS (positions past a row's
    EOS are never supervised). Region r is dropped in a row whose EOS comes at or before p_r, and
    the first region whose k targets reach the EOS is the row's last. The model sees only the
    first seq_len tokens, but targets come from the whole sample: the last region's span can
    reach up to k-1 tokens past the window, and a sample whose EOS falls there still gets its
    real tokens, then EOS (docs/METHOD.md: "its span targets past EOS are EOS").
    starts: each row's first answer token (None: supervise the prompt too). A region is then
    dropped unless its targets are answer tokens: p_r >= start - 1, the prompt's last token
    predicting the answer's first, as at decode time.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if seq_len // n_regions < k:
        raise ValueError(f"seq_len {seq_len} is too short for {n_regions} regions of k={k}: "
                         f"need seq_len >= n_regions * k = {n_regions * k}")
    ends = region_ends(seq_len, n_regions, offset)
    gt_slot, pos, mask, sup = pack_layout(seq_len, k, ends)
    B, L, M = len(seqs), len(pos), n_regions
    idx = torch.full((B, L), mtp_id, dtype=torch.long)
    targets = torch.full((B, M, k), -1, dtype=torch.long)
    past_eos = torch.zeros(B, M, k, dtype=torch.bool)
    valid = torch.zeros(B, M, dtype=torch.bool)
    ends_t = torch.tensor(ends)
    ahead = ends_t[:, None] + torch.arange(1, k + 1)        # (M, k) ground-truth index of each target
    length = torch.zeros(B, dtype=torch.long)
    for b, full in enumerate(seqs):
        # a sample's EOS is its LAST token (chat formats also use that token inside the prompt),
        # wherever it falls, inside the window or past it; a short sample without one ends
        # where its EOS padding starts; a sample cut without one has none
        full = list(full)
        if full[-1] == eos_id:
            eos_at = len(full) - 1
        else:
            eos_at = len(full) if len(full) < seq_len else None
        whole = torch.tensor(full + [eos_id] * (seq_len - len(full)))   # >= seq_len tokens
        idx[b, gt_slot] = whole[:seq_len]
        length[b] = seq_len if eos_at is None else min(eos_at + 1, seq_len)
        valid[b] = ends_t < (seq_len if eos_at is None else eos_at)   # x_p comes before the EOS
        if starts is not None:
            valid[b] &= ends_t >= starts[b] - 1
        if eos_at is not None:
            reach = ends_t + k >= eos_at                     # this region's targets reach the EOS
            first = int(reach.nonzero()[0]) if reach.any() else M
            valid[b, first + 1:] = False
            past_eos[b] = ahead > eos_at
        known = ahead < len(whole)
        targets[b][known] = whole[ahead[known]]
        targets[b][past_eos[b]] = eos_id
    return Packed(idx, pos, mask, gt_slot, sup, length, valid, targets, past_eos)


def teacher_input(packed, rollout):
    """The teacher's layout: every region's masks replaced by the student's own tokens.

    rollout (B, M, k): the student's argmax at each supervised position. Mask slot j of a region
    (j = 1..k-1) gets the student's token y'_j, the prediction made at supervised position j-1.
    """
    idx = packed.idx.clone()
    B, M, k = rollout.shape
    slots = packed.sup[:, 1:].reshape(1, -1).expand(B, -1)  # (B, M*(k-1))
    idx.scatter_(1, slots, rollout[:, :, :-1].reshape(B, -1))
    return idx


# -----------------------------------------------------------------------------
# Prompts and answers

def plain_prompt(question):
    """How our from-scratch models are asked (training and evaluation alike)."""
    return f"Q: {question}\nA:"


def prompt_ids(tok, question):
    """Token ids that ask `question` as a training sample starts: in the tokenizer's chat format
    if it has one, else plain_prompt's "Q: ...\nA:"."""
    return tok.prompt(question) if tok.chat is not None else tok.encode(plain_prompt(question))


def sample_ids(tok, row):
    """Token ids of one training sample: prompt, answer, end token (without a chat format the
    prompt and answer are encoded as one text, so a token may span the seam)."""
    if tok.chat is None:
        return tok.encode(plain_prompt(row["question"]) + " " + row["answer"]) + [tok.eos_id]
    return tok.prompt(row["question"]) + tok.encode(row["answer"]) + [tok.eos_id]


def answer_start(tok, row, ids):
    """Where the answer begins in sample_ids' `ids`: after the tokens they share with the prompt
    alone (a token merged across the seam counts as answer)."""
    prompt = prompt_ids(tok, row["question"])
    n = 0
    while n < min(len(prompt), len(ids)) and prompt[n] == ids[n]:
        n += 1
    return n


def answer_in_window(tok, row, ids, n):
    """Whether the first n of sample_ids' `ids` hold any of the answer, by their length in bytes
    against the prompt's (the answer's bytes end the sample, before its EOS): decoding, not the
    second encoding answer_start makes."""
    answer = (" " if tok.chat is None else "") + row["answer"]
    prompt = len(tok.enc.decode_bytes(ids[:-1])) - len(answer.encode())
    return len(tok.enc.decode_bytes(ids[:n])) > prompt


# -----------------------------------------------------------------------------
# Datasets: rows of {"question", "answer"}, the answer ending in "#### <number>" (GSM8K's format)

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"


def read_jsonl(path):
    """Rows of {"question": str, "answer": str}, one JSON object per line of a UTF-8 file (a
    byte-order mark before the first line, as some Windows editors write, is passed over)."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist or is not a file: give a .jsonl of "
                        "question/answer rows")
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line = line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                other = " (it starts with a UTF-16 byte-order mark)" if n == 1 and \
                    line[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
                raise DataError(f"{path}:{n} is not UTF-8 text{other}: save the file as "
                                "UTF-8") from None
            if line.strip():
                rows.append(jsonl_row(line, f"{path}:{n}"))
    return rows


JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}


def jsonl_row(line, where):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        hint = ("; a .jsonl holds one JSON object per line, not one JSON document across lines"
                if line.strip() in ("[", "{") else "")
        column = min(e.pos, len(line.rstrip("\r\n"))) + 1      # not past the line's end
        raise DataError(f"{where} is not valid JSON ({e.msg} at column {column}){hint}") from None
    if not isinstance(row, dict) or "question" not in row or "answer" not in row:
        has = (f" (it has {', '.join(map(repr, list(row)[:6])) or 'none'})" if isinstance(row, dict)
               else f" (it is {JSON_KINDS.get(type(row), 'no object')}, not an object)")
        raise DataError(f"{where} needs the fields 'question' and 'answer'{has}: one JSON object "
                        "with both per line")
    for name in ("question", "answer"):
        if not isinstance(row[name], str):
            raise DataError(f"{where}: {name!r} must be a string, not {type(row[name]).__name__} "
                            f"({json.dumps(row[name])[:40]})")
    return row


def gsm8k(split):
    """GSM8K `split` ('train' | 'test'): $MTP_CACHE/gsm8k/SPLIT.jsonl, downloaded from GitHub the
    first time (compat/hub.py). A copy elsewhere is read as a .jsonl (load_dataset)."""
    if split not in ("train", "test"):
        raise DataError(f"GSM8K split must be 'train' or 'test', not {split!r}")
    cache = os.path.join(cache_dir(), "gsm8k")
    if os.path.isfile(os.path.join(cache, f"{split}.jsonl")):
        return read_jsonl(os.path.join(cache, f"{split}.jsonl"))
    os.makedirs(cache, exist_ok=True)
    try:
        download(GSM8K_URL.format(split=split), os.path.join(cache, f"{split}.jsonl"))
    except OSError as e:
        raise FileNotFoundError(f"could not download GSM8K {split} ({e}). Offline? Put "
                                f"{split}.jsonl in {cache} or pass its path") from None
    return read_jsonl(os.path.join(cache, f"{split}.jsonl"))


def load_dataset(source, split, limit=None):
    """The rows of 'synthetic', 'gsm8k' (its `split`) or a .jsonl file, at most `limit` of them.
    Synthetic test = the first 200 of a held-out stream; a larger limit reads further on."""
    if source == "synthetic":
        return synthetic_problems(limit or (200 if split == "test" else SYNTHETIC_TRAIN),
                                  seed=SYNTHETIC_TEST_SEED if split == "test" else 0)
    if source == "gsm8k":
        return gsm8k(split)[:limit]
    if source.endswith(".jsonl"):
        return read_jsonl(source)[:limit]
    raise DataError(f"unknown dataset {source!r} (gsm8k, synthetic, or a .jsonl path)")
