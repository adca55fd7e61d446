"""
The embedded default's tokenizer: a byte-level BPE learned from synthetic problems with
train_bpe (deterministic, so it can always be rebuilt; every checkpoint saves its own anyway).
"""
import regex  # a dependency of tiktoken: the \p{L} classes of its patterns
import tiktoken

from data import plain_prompt

from compat.tokenizers import DIGITS_PATTERN, Tokenizer
from synthetic.problems import synthetic_problems


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


def synthetic_tokenizer(vocab_size=512):
    """The embedded default's tokenizer: byte-level BPE learned from 3000 synthetic problems
    (deterministic, so it can always be rebuilt; saved with every checkpoint anyway)."""
    texts = [plain_prompt(r["question"]) + " " + r["answer"] for r in synthetic_problems(3000, seed=0)]
    return Tokenizer(train_bpe(texts, vocab_size, name="synth-bpe"), eos="<|endoftext|>")
