"""
Tokenizers (all through tiktoken), datasets, and the MTP packer.

    from data import load_tokenizer, gsm8k, synthetic_problems, pack
    tok = load_tokenizer("gpt2")                 # or a checkpoint dir, a .tiktoken file
    rows = gsm8k("train")                        # [{"question", "answer"}], local file or download
    rows = synthetic_problems(1000, seed=0)      # built-in grade-school math, no file needed
    batch = pack(seqs, k=4, offset=3, n_regions=5, seq_len=160, mtp_id=..., eos_id=...)

The `<MTP>` id belongs to the model (config.json's mtp_token_id), never to the tokenizer.

See the packed training layout (tokens, position ids, supervised slots and their targets, the
attention mask as a grid, then the teacher's input), printed by the functions distill.py trains with:

    python data.py --show-layout                               # k=3, 2 regions, 16 tokens
    python data.py --show-layout --k 4 --regions 3 --seq-len 24 --offset 5 --problem 7
    python data.py --show-layout --text "Q: 2 + 3?\nA: 5"       # a short text: EOS padding
    python data.py --show-layout --student runs/mtp-synth/ckpt  # the rollout of a real student
"""
import argparse
import base64
import json
import os
import random
import re
import sys
from dataclasses import dataclass

import regex  # a dependency of tiktoken: the \p{L} classes of its patterns
import tiktoken
import torch

# -----------------------------------------------------------------------------
# Tokenizers

# GPT-2's pre-tokenizer regex, and a variant that splits every digit into its own piece (the
# SmolLM2 tokenizer does this, and it makes arithmetic easier to learn for our small models).
# In the variant a run of spaces before a digit stays one piece, as HF's Digits-then-ByteLevel
# pre-tokenizer leaves it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                    "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
# chat formats: how one user turn and the start of the assistant's reply are written
CHAT_FORMATS = {
    "chatml": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message names the file and the fix."""


class DataError(ValueError):
    """A dataset that cannot be read; the message names the file, the line and the fix."""


class Tokenizer:
    """A tiktoken Encoding plus what the project needs to know around it: EOS, stop tokens, chat.

    eos: the token that ends a training sample; stops: every token that ends generation;
    chat: a key of CHAT_FORMATS or None (then prompts are plain text).
    """

    def __init__(self, enc, eos, stops=(), chat=None, bos=None):
        self.enc, self.chat, self.bos = enc, chat, bos
        self.eos_id = enc.encode_single_token(eos)
        self.bos_id = enc.encode_single_token(bos) if bos else None
        self.stop_ids = sorted({self.eos_id} | {enc.encode_single_token(s) for s in stops})

    @property
    def n_vocab(self):
        return self.enc.n_vocab

    def encode(self, text, special=False):
        """special=True lets special tokens written in text (e.g. <|im_start|>) become their ids."""
        return self.enc.encode(text, allowed_special="all" if special else set(), disallowed_special=())

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def prompt(self, text):
        """Token ids that ask the model `text`, in the model's chat format if it has one."""
        if self.chat is None:
            return self.encode(text)
        return self.encode(CHAT_FORMATS[self.chat].format(prompt=text), special=True)

    def save(self, out_dir):
        """tokenizer.tiktoken (ranks) + tokenizer_mtp.json (pattern, specials, eos, chat)."""
        with open(os.path.join(out_dir, "tokenizer.tiktoken"), "w") as f:
            for b, r in sorted(self.enc._mergeable_ranks.items(), key=lambda x: x[1]):
                f.write(f"{base64.b64encode(b).decode()} {r}\n")
        meta = {"name": self.enc.name, "pattern": self.enc._pat_str,
                "special_tokens": self.enc._special_tokens, "eos": self.enc.decode([self.eos_id]),
                "stops": [self.enc.decode([i]) for i in self.stop_ids], "chat": self.chat,
                "bos": self.bos}
        with open(os.path.join(out_dir, "tokenizer_mtp.json"), "w") as f:
            json.dump(meta, f, indent=1)


def read_ranks(path):
    """A tiktoken ranks file: one `base64(token bytes) rank` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path}:{n} is not a tiktoken ranks line "
                                     "('<base64 token> <rank>')") from None
    return ranks


def gpt2_tokenizer(ranks_path=None):
    """tiktoken's gpt2 encoding; offline, from a ranks file (e.g. ../shared/tokenizers/gpt2.tiktoken)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [ranks_path] if ranks_path else [
        os.path.join(os.environ.get("MTP_CACHE", os.path.expanduser("~/.cache/mtp")), "gpt2.tiktoken"),
        os.path.join(here, "..", "shared", "tokenizers", "gpt2.tiktoken")]
    for path in candidates:
        if path and os.path.isfile(path):
            enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=read_ranks(path),
                                    special_tokens={"<|endoftext|>": 50256})
            return Tokenizer(enc, eos="<|endoftext|>")
    if ranks_path:
        raise TokenizerError(f"gpt2 ranks file {ranks_path} does not exist")
    try:
        return Tokenizer(tiktoken.get_encoding("gpt2"), eos="<|endoftext|>")
    except Exception as e:
        raise TokenizerError(f"tiktoken could not fetch the gpt2 encoding ({e}). Offline? Put "
                             f"gpt2.tiktoken in {candidates[0]}") from None


def llama3_tokenizer(path):
    """A Llama-3 `tokenizer.model` (tiktoken ranks format) with its special tokens appended."""
    ranks = read_ranks(path)
    n = len(ranks)
    specials = {s: n + i for i, s in enumerate(LLAMA3_SPECIALS)}
    enc = tiktoken.Encoding(os.path.basename(path), pat_str=LLAMA3_PATTERN,
                            mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, eos="<|eot_id|>", stops=["<|end_of_text|>", "<|eom_id|>"],
                     chat="llama3", bos="<|begin_of_text|>")


def bytes_to_unicode():
    """GPT-2's byte-level BPE writes each byte as a printable unicode character: byte -> char."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def bpe_to_tiktoken(vocab, merges, name="bpe", pattern=DIGITS_PATTERN, specials=()):
    """HF byte-level BPE (token string -> id, merges) as a tiktoken Encoding with the same ids.

    tiktoken merges by rank, so this needs ids that grow in merge order; HF tokenizers trained
    the usual way have that, and we check it rather than assume it.
    """
    decode_char = {c: b for b, c in bytes_to_unicode().items()}
    special_set = set(specials)
    ranks, special_ids = {}, {}
    for tok, i in vocab.items():
        if tok in special_set:
            special_ids[tok] = i
            continue
        try:
            ranks[bytes(decode_char[c] for c in tok)] = i
        except KeyError:
            raise TokenizerError(f"token {tok!r} is not byte-level BPE text") from None
    merged = [vocab.get(a + b) for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in merges)]
    if any(i is None for i in merged) or merged != sorted(merged):
        raise TokenizerError("this BPE's token ids do not follow its merge order, which tiktoken "
                             "needs (id = merge priority)")
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_ids)


def pre_tokenizer_pattern(pre, path):
    """The tiktoken split regex equivalent to a tokenizer.json pre_tokenizer."""
    steps = pre.get("pretokenizers", [pre])
    for step in steps:                            # Llama-3, Qwen2: an explicit Split regex
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            return step["pattern"]["Regex"]
    if any(step.get("type") == "Digits" and step.get("individual_digits") for step in steps):
        return DIGITS_PATTERN                     # SmolLM2: digits one by one, then GPT-2's
    if any(step.get("type") == "ByteLevel" and step.get("use_regex", True) for step in steps):
        return GPT2_PATTERN
    raise TokenizerError(f"{path}: pre_tokenizer {json.dumps(pre)[:200]} has no regex we can "
                         "express in tiktoken")


def hf_json_tokenizer(path, eos=None):
    """A Hugging Face byte-level BPE tokenizer.json, converted to tiktoken."""
    with open(path) as f:
        tj = json.load(f)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: only byte-level BPE tokenizer.json is supported, "
                             f"got model type {model.get('type')!r}")
    specials = [t["content"] for t in tj.get("added_tokens", [])]
    vocab = dict(model["vocab"])
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    pattern = pre_tokenizer_pattern(tj.get("pre_tokenizer") or {}, path)
    enc = bpe_to_tiktoken(vocab, model["merges"], os.path.basename(os.path.dirname(path)), pattern, specials)
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if eos is None and os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            eos = json.load(f).get("eos_token")
        eos = eos["content"] if isinstance(eos, dict) else eos
    eos = eos or specials[0]
    chat = "chatml" if "<|im_start|>" in specials else "llama3" if "<|start_header_id|>" in specials else None
    stops = [s for s in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>") if s in specials]
    return Tokenizer(enc, eos=eos, stops=stops, chat=chat)


def load_tokenizer(spec):
    """'gpt2', a .tiktoken ranks file, or a checkpoint directory holding one of: our
    tokenizer.tiktoken + tokenizer_mtp.json, a HF tokenizer.json, a Llama-3 tokenizer.model."""
    if spec == "gpt2":
        return gpt2_tokenizer()
    if os.path.isfile(spec):
        if spec.endswith(".model"):
            return llama3_tokenizer(spec)
        return gpt2_tokenizer(spec)
    if not os.path.isdir(spec):
        raise TokenizerError(f"tokenizer {spec!r}: not 'gpt2', a file, or a checkpoint directory")
    ours = os.path.join(spec, "tokenizer_mtp.json")
    if os.path.isfile(ours):
        with open(ours) as f:
            meta = json.load(f)
        enc = tiktoken.Encoding(meta["name"], pat_str=meta["pattern"],
                                mergeable_ranks=read_ranks(os.path.join(spec, "tokenizer.tiktoken")),
                                special_tokens=meta["special_tokens"])
        return Tokenizer(enc, eos=meta["eos"], stops=meta.get("stops", ()), chat=meta.get("chat"),
                         bos=meta.get("bos"))
    if os.path.isfile(os.path.join(spec, "tokenizer.model")):     # Llama-3's own tiktoken file
        return llama3_tokenizer(os.path.join(spec, "tokenizer.model"))
    if os.path.isfile(os.path.join(spec, "tokenizer.json")):
        return hf_json_tokenizer(os.path.join(spec, "tokenizer.json"))
    cfg = os.path.join(spec, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            if json.load(f).get("model_type") == "gpt2":
                return gpt2_tokenizer()
    raise TokenizerError(f"no tokenizer in {spec}: expected tokenizer_mtp.json + tokenizer.tiktoken, "
                         "tokenizer.json or tokenizer.model")


def train_bpe(texts, vocab_size, pattern=DIGITS_PATTERN, name="bpe", specials=("<|endoftext|>",)):
    """Byte-level BPE learned from texts: the 256 bytes, then the most frequent adjacent pair is
    merged into a new token until vocab_size. Deterministic (ties broken by the pair's bytes)."""
    pieces = {}   # pre-tokenized pieces, counted once: merges never cross piece boundaries
    for t in texts:
        for piece in regex.findall(pattern, t):
            pieces[piece] = pieces.get(piece, 0) + 1
    words = {tuple(bytes([b]) for b in w.encode()): c for w, c in pieces.items()}
    ranks = {bytes([b]): b for b in range(256)}
    n_merges = vocab_size - 256 - len(specials)
    for _ in range(n_merges):
        pairs = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        new = best[0] + best[1]
        ranks[new] = len(ranks)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    special_ids = {s: len(ranks) + i for i, s in enumerate(specials)}
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_ids)


# -----------------------------------------------------------------------------
# Datasets: rows of {"question", "answer"}, the answer ending in "#### <number>" (GSM8K's format)

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}:{n} is not valid JSON") from None
                if "question" not in row or "answer" not in row:
                    raise DataError(f"{path}:{n} needs the fields 'question' and 'answer'")
                rows.append(row)
    return rows


def gsm8k(split, path=None):
    """GSM8K `split` ('train' | 'test'): from `path`, ../shared/data/gsm8k, the cache, or GitHub."""
    if split not in ("train", "test"):
        raise DataError(f"GSM8K split must be 'train' or 'test', not {split!r}")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GSM8K file {path} does not exist")
        return read_jsonl(path)
    here = os.path.dirname(os.path.abspath(__file__))
    cache = os.path.join(os.environ.get("MTP_CACHE", os.path.expanduser("~/.cache/mtp")), "gsm8k")
    for d in (os.path.join(here, "..", "shared", "data", "gsm8k"), cache):
        if os.path.isfile(os.path.join(d, f"{split}.jsonl")):
            return read_jsonl(os.path.join(d, f"{split}.jsonl"))
    from model import download  # one downloader for weights and data
    os.makedirs(cache, exist_ok=True)
    try:
        download(GSM8K_URL.format(split=split), os.path.join(cache, f"{split}.jsonl"))
    except OSError as e:
        raise FileNotFoundError(f"could not download GSM8K {split} ({e}). Offline? Put "
                                f"{split}.jsonl in {cache} or pass its path") from None
    return read_jsonl(os.path.join(cache, f"{split}.jsonl"))


NAMES = [("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dan", "he"), ("Emma", "she"),
         ("Finn", "he"), ("Grace", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jack", "he"),
         ("Lily", "she"), ("Max", "he"), ("Nora", "she"), ("Omar", "he"), ("Ruby", "she"), ("Sam", "he")]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "cards",
         "stamps", "beads", "oranges", "toys"]
GAINS = [("buys", "buying"), ("finds", "finding"), ("gets", "getting"), ("picks up", "picking up")]
LOSSES = [("gives away", "giving away"), ("loses", "losing"), ("sells", "selling"), ("uses", "using")]
THINGS = ["book", "game", "ball", "kite", "hat", "puzzle"]


def _chain(r):
    """Start amount, then 2-4 gains or losses, one line of arithmetic for each."""
    (name, he), item = r.choice(NAMES), r.choice(ITEMS)
    have = r.randint(10, 60)
    q = [f"{name} has {have} {item}."]
    a = [f"{name} starts with {have} {item}."]
    for step in range(r.randint(2, 4)):
        then = "Then " + he if step else he.capitalize()
        if r.random() < 0.5 or have < 10:
            n = r.randint(2, 40)
            verb, ing = r.choice(GAINS)
            q.append(f"{then} {verb} {n} more.")
            a.append(f"After {ing} {n}, {name} has {have} + {n} = {have + n} {item}.")
            have += n
        else:
            n = r.randint(2, have - 1)
            verb, ing = r.choice(LOSSES)
            q.append(f"{then} {verb} {n}.")
            a.append(f"After {ing} {n}, {name} has {have} - {n} = {have - n} {item}.")
            have -= n
    q.append(f"How many {item} does {name} have now?")
    return q, a, have


def _boxes(r):
    (name, he), item = r.choice(NAMES), r.choice(ITEMS)
    g, n = r.randint(2, 9), r.randint(2, 12)
    t = g * n
    e = r.randint(1, t - 1)
    q = [f"{name} buys {g} boxes of {item}.", f"Each box holds {n} {item}.",
         f"{he.capitalize()} gives away {e} of them.", f"How many {item} does {name} have left?"]
    a = [f"{g} boxes of {n} {item} hold {g} * {n} = {t} {item}.",
         f"After giving away {e}, {name} has {t} - {e} = {t - e} {item} left."]
    return q, a, t - e


def _change(r):
    (name, _), thing = r.choice(NAMES), r.choice(THINGS)
    p = r.randint(2, 12)
    k = r.randint(2, min(9, 100 // p))
    bill = 100 if p * k > 50 else r.choice([50, 100])
    q = [f"A {thing} costs {p} dollars.", f"{name} buys {k} of them and pays with a {bill} dollar bill.",
         f"How much change does {name} get?"]
    a = [f"{k} of them cost {k} * {p} = {k * p} dollars.",
         f"The change is {bill} - {k * p} = {bill - k * p} dollars."]
    return q, a, bill - k * p


def _compare(r):
    (x, _), (y, _), (z, _) = r.sample(NAMES, 3)
    item = r.choice(ITEMS)
    n, m = r.randint(2, 12), r.randint(2, 5)
    b = n * m
    d = r.randint(1, b - 1)
    c = b - d
    q = [f"{x} has {n} {item}.", f"{y} has {m} times as many {item} as {x}.",
         f"{z} has {d} fewer {item} than {y}.", f"How many {item} do they have together?"]
    a = [f"{y} has {n} * {m} = {b} {item}.", f"{z} has {b} - {d} = {c} {item}.",
         f"Together they have {n} + {b} + {c} = {n + b + c} {item}."]
    return q, a, n + b + c


def _share(r):
    (name, _), item = r.choice(NAMES), r.choice(ITEMS)
    n, each = r.randint(2, 9), r.randint(2, 12)
    t, e = n * each, r.randint(2, 20)
    q = [f"{name} shares {t} {item} equally among {n} friends.",
         f"Then each friend gets {e} more {item}.", f"How many {item} does each friend have?"]
    a = [f"Each friend gets {t} / {n} = {each} {item}.",
         f"With {e} more, each friend has {each} + {e} = {each + e} {item}."]
    return q, a, each + e


def _savings(r):
    (name, he), thing = r.choice(NAMES), r.choice(THINGS)
    w, s = r.randint(2, 9), r.randint(2, 12)
    t = w * s
    spend = r.randint(1, t - 1)
    q = [f"{name} saves {s} dollars every week for {w} weeks.",
         f"Then {he} spends {spend} dollars on a {thing}.", f"How much money does {name} have left?"]
    a = [f"{name} saves {w} * {s} = {t} dollars.",
         f"After spending {spend}, {name} has {t} - {spend} = {t - spend} dollars left."]
    return q, a, t - spend


TEMPLATES = [_chain, _boxes, _change, _compare, _share, _savings]


def synthetic_problems(n, seed=0):
    """n grade-school math problems in GSM8K's format, fully determined by seed."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a, result = r.choice(TEMPLATES)(r)
        rows.append({"question": " ".join(q), "answer": "\n".join(a) + f"\n#### {result}"})
    return rows


# test problems come from a seed range training never uses
SYNTHETIC_TEST_SEED = 1_000_003


def load_dataset(name, split, path=None, limit=None):
    """'gsm8k' or 'synthetic' (a jsonl path works for either name via `path`); at most `limit`
    rows. Synthetic test = the first 200 of a held-out stream; a larger limit reads further on."""
    if name == "synthetic":
        return synthetic_problems(limit or (200 if split == "test" else 50_000),
                                  seed=SYNTHETIC_TEST_SEED if split == "test" else 0)
    if name == "gsm8k":
        return gsm8k(split, path)[:limit]
    if path:
        return read_jsonl(path)[:limit]
    raise DataError(f"unknown dataset {name!r} (gsm8k, synthetic, or a .jsonl path)")


# -----------------------------------------------------------------------------
# Prompts and answers

def plain_prompt(question):
    """How our from-scratch models are asked (training and evaluation alike)."""
    return f"Q: {question}\nA:"


def sample_ids(tok, row):
    """Token ids of one training sample: prompt, answer, end token."""
    if tok.chat is None:
        return tok.encode(plain_prompt(row["question"]) + " " + row["answer"]) + [tok.eos_id]
    return tok.prompt(row["question"]) + tok.encode(row["answer"]) + [tok.eos_id]


NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gold_answer(answer):
    """The number after '####' in a GSM8K answer."""
    return answer.split("####")[-1].strip().replace(",", "")


def extract_flexible(text):
    """The last number in the text (GSM8K 'flexible-extract')."""
    nums = NUMBER.findall(text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def extract_strict(text):
    """The number after '#### ' or 'The answer is ' (GSM8K 'strict-match')."""
    m = re.search(r"(?:####|The answer is)\s*\$?(-?[\d,]*\.?\d+)", text)
    return m.group(1).replace(",", "") if m else None


def same_number(a, b):
    try:
        return a is not None and float(a) == float(b)
    except ValueError:
        return False


# -----------------------------------------------------------------------------
# Packing many MTP problems into one training sequence (METHOD.md, "Packing")

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


def pack(seqs, k, offset, n_regions, seq_len, mtp_id, eos_id):
    """Pack token sequences (each ending in EOS, or cut at seq_len) into the student layout.

    Rows longer than seq_len are cut; shorter ones are padded with EOS (positions past a row's
    EOS are never supervised). Region r is dropped in a row whose EOS comes at or before p_r, and
    the first region whose k targets reach the EOS is the row's last. The model sees only the
    first seq_len tokens, but targets come from the whole sample: the last region's span can
    reach up to k-1 tokens past the window, and a sample whose EOS falls there still gets its
    real tokens, then EOS (METHOD.md: "its span targets past EOS are EOS").
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


def synthetic_tokenizer(vocab_size=512):
    """The embedded default's tokenizer: byte-level BPE learned from 3000 synthetic problems
    (deterministic, so it can always be rebuilt; saved with every checkpoint anyway)."""
    texts = [plain_prompt(r["question"]) + " " + r["answer"] for r in synthetic_problems(3000, seed=0)]
    return Tokenizer(train_bpe(texts, vocab_size, name="synth-bpe"), eos="<|endoftext|>")


# -----------------------------------------------------------------------------
# Showing the packed layout: every cell printed comes from pack / teacher_input /
# distill.supervised_weight, the functions the training loop calls

SHOW_DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "checkpoints", "synth-teacher")


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
    from distill import TrainConfig, supervised_weight   # distill imports data: import late
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
    p.add_argument("--show-layout", action="store_true", help="print the layout (the only mode)")
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
        if not a.show_layout:
            raise DataError("nothing to do: pass --show-layout")
        if a.k < 1 or a.regions < 1 or a.seq_len < 1:
            raise DataError("--k, --regions and --seq-len must be >= 1")
        if a.seq_len + a.regions * (a.k - 1) > 100:
            raise DataError("the grid prints one character per packed slot: keep --seq-len + "
                            "--regions * (k - 1) <= 100")
        if a.problem < 0:
            raise DataError(f"--problem must be >= 0 (got {a.problem})")
        if a.text is not None and not a.text:
            raise DataError("--text is empty: give some text")
        student = None
        if a.student:
            from model import CheckpointError, Transformer
            try:
                student = Transformer.from_pretrained(a.student).eval()
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
