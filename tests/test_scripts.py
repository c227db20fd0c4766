"""scripts/: prepare.sh on a local folder and on the default model, download errors, converter errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_hf_model

ROOT = Path(__file__).resolve().parent.parent


def sh(*args, **env):
    full = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, **env)
    return subprocess.run([*map(str, args)], capture_output=True, text=True, env=full, cwd=ROOT, timeout=900)


def test_prepare_local_folder_twice(tmp_path, spm_dir):
    make_hf_model("qwen2_bias", tmp_path, spm_dir)
    (tmp_path / "model.pth").unlink()
    for _ in range(2):  # idempotent
        r = sh("bash", "scripts/prepare.sh", tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"ready: {tmp_path}" in r.stdout
    config = json.loads((tmp_path / "model_config.json").read_text())
    assert config["model_args"]["attention_bias"] is True and config["format"]["dtype"] == "float32"


@pytest.mark.real_model
def test_prepare_default_model(tmp_path, smollm2_gguf):
    r = sh("bash", "scripts/prepare.sh", CHECKPOINTS_DIR=str(tmp_path), FASTLLAMA_CACHE=str(smollm2_gguf.parent.parent))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    assert (out / "model.pth").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "model_config.json").read_text())["format"]["source"] == "gguf"
    again = sh("bash", "scripts/prepare.sh", CHECKPOINTS_DIR=str(tmp_path))
    assert again.returncode == 0 and "ready" in again.stdout


def test_prepare_bad_argument():
    r = sh("bash", "scripts/prepare.sh", "not-a-repo-or-folder")
    assert r.returncode != 0 and "neither a local folder" in r.stderr


def test_download_offline_is_one_clear_line(tmp_path):
    r = sh(sys.executable, "scripts/download.py", "--repo_id", "HuggingFaceTB/SmolLM2-135M-Instruct",
           "--checkpoints_dir", tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "unreachable" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_convert_errors(tmp_path):
    r = sh(sys.executable, "scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path)
    assert r.returncode != 0 and "config.json" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    r = sh(sys.executable, "scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path)
    assert r.returncode != 0 and "supported: llama, mistral, qwen2" in r.stderr and "Traceback" not in r.stderr


def test_convert_keeps_dtype_and_llama3_tokenizer(tmp_path):
    """A bf16 checkpoint stays bf16; Llama 3's original/tokenizer.model (tiktoken) is picked up."""
    import base64

    import torch

    from checkpoint import Checkpoint
    from tokenizer import TiktokenTokenizer, get_tokenizer

    hf = make_hf_model("llama31_gqa", tmp_path / "src")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16" / "original").mkdir()
    ranks = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    (tmp_path / "bf16" / "original" / "tokenizer.model").write_text(ranks)
    r = sh("bash", "scripts/prepare.sh", tmp_path / "bf16")
    assert r.returncode == 0, r.stderr
    ckpt = Checkpoint.open(tmp_path / "bf16")
    assert ckpt.format.dtype == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in ckpt.state_dict().values())
    assert isinstance(get_tokenizer(tmp_path / "bf16"), TiktokenTokenizer)
