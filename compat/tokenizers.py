"""
Every tokenizer of the project, all through tiktoken: GPT-2's, our own saved ones (a checkpoint's
tokenizer.tiktoken + tokenizer_mtp.json), a Hugging Face byte-level BPE tokenizer.json (GPT-2,
SmolLM2, Qwen2/3 and most others) and Llama-3's tokenizer.model.

    from compat.tokenizers import load_tokenizer
    tok = load_tokenizer("gpt2")                 # or a checkpoint dir, a .tiktoken file
    ids = tok.encode("Q: ...\nA:"); text = tok.decode(ids); tok.eos_id, tok.stop_ids

The `<MTP>` id belongs to the model (config.json's mtp_token_id), never to the tokenizer. The
embedded default's tokenizer is learned from the synthetic problems (synthetic/tokenizer.py);
the GGUF converter (tools/convert_gguf.py) reuses bpe_to_tiktoken.
"""
import base64
import json
import os

import tiktoken

from compat.hub import cache_dir


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message names the file and the fix."""


# GPT-2's pre-tokenizer regex, and a variant that splits every digit into its own piece (the
# SmolLM2 tokenizer does this, and it makes arithmetic easier to learn for our small models).
# In the variant a run of spaces before a digit stays one piece, as HF's Digits-then-ByteLevel
# pre-tokenizer leaves it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# chat formats: how one user turn and the start of the assistant's reply are written
CHAT_FORMATS = {
    "chatml": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
}




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


RESTORE = ("copy the tokenizer files again from the checkpoint this one was made from (for a run's "
           "ckpt: its --init)")


def json_file(path):
    """A JSON object the tokenizer is read from; a damaged file is a TokenizerError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except ValueError as e:                 # not JSON, not UTF-8
        raise TokenizerError(f"{path} is not valid JSON ({e}): {RESTORE}") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path} is not a JSON object: {RESTORE}")
    return d


def same_tokenizer(a, b):
    """The same token ids for the same text: ranks, special tokens and split pattern alike."""
    return (a.enc._mergeable_ranks == b.enc._mergeable_ranks and a.enc._pat_str == b.enc._pat_str
            and a.enc._special_tokens == b.enc._special_tokens)


def check_vocab(tok, cfg, where):
    """Every id of the tokenizer must be a row of the model's vocabulary (config cfg), below its
    <MTP> row: another model's tokenizer would index past the embedding, or train on <MTP>."""
    rows = cfg.vocab_size if cfg.mtp_token_id is None else cfg.mtp_token_id
    if tok.n_vocab > rows:
        before = "" if cfg.mtp_token_id is None else " before <MTP>"
        raise TokenizerError(f"{where}: its tokenizer has ids up to {tok.n_vocab - 1}, but the model "
                             f"has {rows} token rows{before}: the tokenizer is another model's; put "
                             "the model's own beside its weights")


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
    """tiktoken's gpt2 encoding: from a ranks file if given, else $MTP_CACHE/gpt2.tiktoken if it
    is there (offline), else tiktoken's own download."""
    path = ranks_path or os.path.join(cache_dir(), "gpt2.tiktoken")
    if os.path.isfile(path):
        enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=read_ranks(path),
                                special_tokens={"<|endoftext|>": 50256})
        return Tokenizer(enc, eos="<|endoftext|>")
    if ranks_path:
        raise TokenizerError(f"gpt2 ranks file {ranks_path} does not exist")
    try:
        return Tokenizer(tiktoken.get_encoding("gpt2"), eos="<|endoftext|>")
    except Exception as e:
        raise TokenizerError(f"tiktoken could not fetch the gpt2 encoding ({e}). Offline? Put "
                             f"gpt2.tiktoken in {path}") from None


# -----------------------------------------------------------------------------
# Real checkpoints' tokenizers: Llama-3's tokenizer.model, HF byte-level BPE tokenizer.json

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
    tj = json_file(path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: only byte-level BPE tokenizer.json is supported, "
                             f"got model type {model.get('type')!r}")
    try:
        specials = [t["content"] for t in tj.get("added_tokens", [])]
        vocab = dict(model["vocab"])
        vocab.update({t["content"]: t["id"] for t in tj.get("added_tokens", [])})
        merges = model["merges"]
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"{path} is not a usable tokenizer.json ({e!r}): {RESTORE}") from None
    pattern = pre_tokenizer_pattern(tj.get("pre_tokenizer") or {}, path)
    enc = bpe_to_tiktoken(vocab, merges, os.path.basename(os.path.dirname(path)), pattern, specials)
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if eos is None and os.path.isfile(cfg_path):
        eos = json_file(cfg_path).get("eos_token")
        eos = eos["content"] if isinstance(eos, dict) else eos
    eos = eos or specials[0]
    chat = "chatml" if "<|im_start|>" in specials else "llama3" if "<|start_header_id|>" in specials else None
    stops = [s for s in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>") if s in specials]
    return Tokenizer(enc, eos=eos, stops=stops, chat=chat)


# -----------------------------------------------------------------------------
# Any of them, by name, file or checkpoint directory

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
        if not os.path.isfile(os.path.join(spec, "tokenizer.tiktoken")):
            raise TokenizerError(f"{spec} has tokenizer_mtp.json but no tokenizer.tiktoken, the "
                                 f"token list it goes with: {RESTORE}")
        try:
            with open(ours, encoding="utf-8") as f:
                meta = json.load(f)
            enc = tiktoken.Encoding(meta["name"], pat_str=meta["pattern"],
                                    mergeable_ranks=read_ranks(os.path.join(spec, "tokenizer.tiktoken")),
                                    special_tokens=meta["special_tokens"])
            return Tokenizer(enc, eos=meta["eos"], stops=meta.get("stops", ()), chat=meta.get("chat"),
                             bos=meta.get("bos"))
        except (ValueError, KeyError, TypeError, OSError) as e:
            if isinstance(e, TokenizerError):
                raise
            raise TokenizerError(f"{ours} (with tokenizer.tiktoken) is not a usable tokenizer "
                                 f"({e!r}): {RESTORE}") from None
    if os.path.isfile(os.path.join(spec, "tokenizer.model")):     # Llama-3's own tiktoken file
        return llama3_tokenizer(os.path.join(spec, "tokenizer.model"))
    if os.path.isfile(os.path.join(spec, "tokenizer.json")):      # a Hugging Face tokenizer
        return hf_json_tokenizer(os.path.join(spec, "tokenizer.json"))
    cfg = os.path.join(spec, "config.json")
    if os.path.isfile(cfg) and json_file(cfg).get("model_type") == "gpt2":
        return gpt2_tokenizer()
    raise TokenizerError(f"no tokenizer in {spec}: expected tokenizer_mtp.json + tokenizer.tiktoken, "
                         "tokenizer.json or tokenizer.model")
