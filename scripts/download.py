"""Download a Hugging Face hub repo (weights, config, tokenizer) into checkpoints/REPO_ID.

safetensors are preferred: *.bin files are fetched only when the repo has no *.safetensors.
The token comes from --hf_token or $HF_TOKEN (gated repos such as meta-llama need one).
Usage: python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M-Instruct
"""
import argparse
import os
import sys
from pathlib import Path

PATTERNS = ["*.json", "*.jinja", "tokenizer.model", "original/tokenizer.model"]


def download(repo_id: str, out_dir: Path, hf_token: str | None = None) -> Path:
    """snapshot_download repo_id into out_dir; RuntimeError with one clear line on failure."""
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    token = hf_token or os.environ.get("HF_TOKEN")
    try:
        files = list_repo_files(repo_id, token=token)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
        snapshot_download(repo_id, local_dir=out_dir, token=token, allow_patterns=PATTERNS + weights)
    except GatedRepoError:
        raise RuntimeError(f"{repo_id} is gated: accept its license on the hub, then pass --hf_token or set "
                           "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise RuntimeError(f"{repo_id} not found on the hub (or private: pass --hf_token)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise RuntimeError("the Hugging Face hub is unreachable: offline mode is on (HF_HUB_OFFLINE=1); unset it, "
                           "or pass a local model folder to scripts/prepare.sh instead") from None
    except OSError as e:  # connection errors from requests / httpx
        raise RuntimeError(f"could not reach the Hugging Face hub ({type(e).__name__}); check the network "
                           "or pass a local model folder to scripts/prepare.sh") from None
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo_id", required=True, help="e.g. meta-llama/Llama-3.2-1B-Instruct")
    parser.add_argument("--hf_token", default=None, help="hub token (default: $HF_TOKEN)")
    parser.add_argument("--checkpoints_dir", type=Path, default=Path("checkpoints"), help="parent of the repo folder")
    a = parser.parse_args()
    try:
        print(download(a.repo_id, a.checkpoints_dir / a.repo_id, a.hf_token))
    except RuntimeError as e:
        sys.exit(f"error: {e}")
