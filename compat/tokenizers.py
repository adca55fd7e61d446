"""
Tokenizers of real checkpoints, brought into tiktoken: a Hugging Face byte-level BPE
tokenizer.json (GPT-2, SmolLM2, Qwen2/3 and most others) and Llama-3's tokenizer.model.
data.load_tokenizer calls these for a checkpoint directory that holds one; the GGUF converter
(tools/convert_gguf.py) reuses bpe_to_tiktoken.
"""
import json
import os

import tiktoken

from data import DIGITS_PATTERN, GPT2_PATTERN, Tokenizer, TokenizerError, read_ranks

LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                    "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])


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
