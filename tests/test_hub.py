"""Hub names: `--init gpt2` downloads config + safetensors into $MTP_CACHE (here from a local
HTTP server that serves a tiny checkpoint built in the test), and fails clearly when offline."""
import functools
import http.server
import os
import threading

import pytest
import torch

from conftest import GPT2_RANKS, tiny_config
from model import CheckpointError, Transformer
from compat.hf import from_pretrained, save_pretrained


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A local 'hub': files under root/<org>/<name>/resolve/main/, served on a free port."""
    root = tmp_path / "hub"
    repo = root / "openai-community" / "gpt2" / "resolve" / "main"
    repo.mkdir(parents=True)
    torch.manual_seed(0)
    model = Transformer(tiny_config("gpt2", vocab=50257, max_seq_len=128))
    save_pretrained(model, repo)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MTP_HUB_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("MTP_CACHE", str(tmp_path / "cache"))
    yield model
    server.shutdown()


def test_gpt2_hub_name_downloads_and_loads(hub, tmp_path):
    m = from_pretrained("gpt2")
    cached = tmp_path / "cache" / "openai-community--gpt2"
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    idx = torch.randint(0, 50257, (1, 9))
    assert torch.equal(m(idx), hub(idx))
    assert not any(name.endswith(".part") for name in os.listdir(cached))


@pytest.mark.skipif(not os.path.isfile(GPT2_RANKS), reason=f"needs {GPT2_RANKS}")
def test_distill_init_gpt2_end_to_end(hub, tmp_path):
    import json
    import shutil
    from synthetic.problems import synthetic_problems
    from distill import parse_args, train
    (tmp_path / "cache").mkdir(exist_ok=True)          # offline, gpt2's tokenizer is read there
    shutil.copy(GPT2_RANKS, tmp_path / "cache" / "gpt2.tiktoken")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in synthetic_problems(20)))
    student = train(parse_args(["--init", "gpt2", "--out", str(tmp_path / "run"), "--steps", "2",
                                "--seq-len", "64", "--micro-batch", "2", "--step-tokens", "128",
                                "--data", str(rows),
                                "--threads", "1"]))
    assert student.cfg.mtp_token_id == 50257 and student.cfg.vocab_size == 50258


def test_offline_error_names_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_HUB_URL", "http://127.0.0.1:9")      # nothing listens there
    monkeypatch.setenv("MTP_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="Put its config.json and model.safetensors"):
        from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not (tmp_path / "HuggingFaceTB--SmolLM2-135M-Instruct" / "config.json").exists()
