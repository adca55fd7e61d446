"""
Hub names: download a checkpoint's config.json + safetensors (+ tokenizer files), or a data
file, with the standard library, into $MTP_CACHE (default ~/.cache/mtp). Offline, the errors
say which files to put where. compat.hf.from_pretrained calls resolve_checkpoint for a
name that is not a local directory; data.gsm8k calls download when no local copy exists.
"""
import json
import os
import re
import urllib.error
import urllib.request

from model import CheckpointError

HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "original/tokenizer.model"]


def cache_dir():
    return os.environ.get("MTP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mtp"))


def hub_url():
    return os.environ.get("MTP_HUB_URL", "https://huggingface.co")


def download(url, dest):
    """Fetch url into dest atomically; returns False on a 404, raises on other failures."""
    req = urllib.request.Request(url)
    if os.environ.get("HF_TOKEN"):               # gated repos (Llama) need a token
        req.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r, open(dest + ".part", "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise
    os.replace(dest + ".part", dest)
    return True


def resolve_checkpoint(name):
    """A local directory as is; a hub name -> its directory in the cache, downloaded if needed."""
    if os.path.isdir(name):
        return name
    repo = HUB_ALIASES.get(name, name)
    if os.path.exists(name) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo):
        raise CheckpointError(f"{name!r} is neither a checkpoint directory nor a hub name "
                              "like 'gpt2' or 'org/model'")
    local = os.path.join(cache_dir(), repo.replace("/", "--"))
    if os.path.isfile(os.path.join(local, "config.json")):
        return local
    os.makedirs(local, exist_ok=True)
    base = f"{hub_url()}/{repo}/resolve/main"
    try:
        if not download(f"{base}/config.json", os.path.join(local, "config.json")):
            raise CheckpointError(f"{repo} has no config.json on the hub")
        if not download(f"{base}/model.safetensors", os.path.join(local, "model.safetensors")):
            idx = os.path.join(local, "model.safetensors.index.json")
            if not download(f"{base}/model.safetensors.index.json", idx):
                raise CheckpointError(f"{repo} has no safetensors weights on the hub")
            with open(idx) as f:
                for shard in sorted(set(json.load(f)["weight_map"].values())):
                    download(f"{base}/{shard}", os.path.join(local, shard))
        for fn in TOKENIZER_FILES:                # optional: not every repo has each
            download(f"{base}/{fn}", os.path.join(local, os.path.basename(fn)))
    except (urllib.error.URLError, OSError) as e:
        if os.path.isfile(os.path.join(local, "config.json")):
            os.remove(os.path.join(local, "config.json"))   # do not leave a half checkpoint
        raise CheckpointError(
            f"could not download {repo} ({e}). Offline? Put its config.json and model.safetensors "
            f"(and tokenizer files) in {local}, or pass a local checkpoint directory") from None
    return local
