"""Tokenizers for the checkpoints fastllama runs: Hugging Face tokenizer.json, sentencepiece and tiktoken.

`get_tokenizer(folder)` picks one from the files in a checkpoint folder:
  tokenizer.json   -> the `tokenizers` library (most HF repos, and what scripts/convert_gguf.py writes)
  tokenizer.model  -> sentencepiece (Llama 2, Mistral, TinyLlama) or tiktoken (Llama 3, base64 ranks)
Every tokenizer has encode / decode, bos_id, stop_ids and apply_chat_template; the chat template is
the model's own (tokenizer_config.json or chat_template.jinja), rendered the way transformers does.
"""
import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

from files import REMAKE, BadFile, first_line, read_json, verify

# the files of a checkpoint folder that say how text becomes tokens and back (and how a chat is spelled)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
# tokens that end an assistant turn in the chat formats we know
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "</s>")

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **special) -> str:
    """Render a Hugging Face chat template (Jinja) with the same environment transformers uses."""
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


class Tokenizer:
    """Common interface; subclasses fill vocab-specific parts."""

    bos_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = True
    chat_template: str | None = None
    stop_ids: set[int] = frozenset()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template spells it (a string; encode it without BOS)."""
        for m in messages:
            if set(m) - {"role", "content"} or not isinstance(m.get("content"), str):
                raise ValueError(f"a chat message needs a 'role' and a string 'content', got {m!r}")
        if self.chat_template is None:
            raise ValueError("the model has no chat template (none in its tokenizer_config.json or "
                             "chat_template.jinja); send the text as a prompt instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def _stop_ids_from(self, extra_ids=()) -> set[int]:
        ids = {self.token_to_id(t) for t in (self.eos_token, *END_OF_TURN_TOKENS) if t}
        return {i for i in ids | set(extra_ids) if i is not None}


class Detokenizer:
    """The text of a growing list of token ids, piece by piece: push(id) returns the text that id completes.

    A trailing incomplete UTF-8 character (decoded as U+FFFD) is held back until the tokens that finish it arrive.
    Each push decodes only a short window (the tokens since the last text plus the ones before them), so a long
    answer costs the same per token as a short one; `context`, the last tokens before the new ones (the prompt's),
    gives the first new token its spacing as it has after them (sentencepiece drops a leading space otherwise).
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] = ()):
        self.tokenizer, self.ids = tokenizer, list(context)
        self.start, self.read = 0, len(self.ids)  # ids[start:read]: decoded already, kept as the window's context

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        text = self.tokenizer.decode(self.ids[self.start:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """The text held back, as decoding all the ids gives it (an incomplete character as U+FFFD), at the end."""
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        text = self.tokenizer.decode(self.ids[self.start:])
        self.start = self.read = len(self.ids)
        return text[len(before):]


def _read_json(path: Path) -> dict:
    return read_json(path, REMAKE) if path.is_file() else {}


def _token_content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _generation_eos_ids(folder: Path) -> list[int]:
    """eos_token_id(s) from generation_config.json and config.json, which may name several."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(folder / name).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return ids


def chat_template_of(folder: Path, config: dict) -> str | None:
    """The folder's own chat template (chat_template.jinja, else tokenizer_config.json's `config`), or None."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json plus the special tokens and chat template of tokenizer_config.json."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as RustTokenizer

        self.tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
        self.chat_template = chat_template_of(folder, config)
        self.stop_ids = self._stop_ids_from(_generation_eos_ids(folder))

    def encode(self, text, add_special_tokens=True):
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece tokenizer.model (Llama 2 family)."""

    def __init__(self, folder: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        config = _read_json(folder / "tokenizer_config.json")
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.sp.id_to_piece(self.sp.eos_id()) if self.sp.eos_id() >= 0 else None
        self.add_bos = bool(config.get("add_bos_token", True)) and self.bos_id is not None
        self.chat_template = chat_template_of(folder, config) or LLAMA2_TEMPLATE
        self.stop_ids = self._stop_ids_from(_generation_eos_ids(folder))

    def encode(self, text, add_special_tokens=True):
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_special_tokens and self.add_bos else ids

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def token_to_id(self, token):
        i = self.sp.piece_to_id(token)
        return i if i != self.sp.unk_id() or token == self.sp.id_to_piece(i) else None


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tiktoken tokenizer.model (base64 token, rank per line) with its 256 special tokens."""

    def __init__(self, folder: Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(folder / "tokenizer.model"))
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        names = named + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(named) + 2)]
        self.special = {name: len(ranks) + i for i, name in enumerate(names)}
        self.enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks, special_tokens=self.special)
        config = _read_json(folder / "tokenizer_config.json")
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|eot_id|>"
        self.bos_id = self.special[self.bos_token]
        self.chat_template = chat_template_of(folder, config) or LLAMA3_TEMPLATE
        self.stop_ids = self._stop_ids_from(_generation_eos_ids(folder))

    def encode(self, text, add_special_tokens=True):
        ids = self.enc.encode(text, allowed_special="all")
        return [self.bos_id] + ids if add_special_tokens and ids[:1] != [self.bos_id] else ids

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def token_to_id(self, token):
        if token in self.special:
            return self.special[token]
        ids = self.enc.encode(token, allowed_special="all")
        return ids[0] if len(ids) == 1 else None


def tokenizer_file(folder) -> Path:
    """The tokenizer file of a checkpoint folder (Checkpoint.folder)."""
    folder = Path(folder)
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {folder}; re-run scripts/prepare.sh for this "
                            "model")


def tokenizer_fingerprint(folder) -> str:
    """sha256 of a checkpoint folder's tokenizer file: equal fingerprints mean the same text <-> id mapping."""
    return hashlib.sha256(tokenizer_file(folder).read_bytes()).hexdigest()


def get_tokenizer(folder) -> Tokenizer:
    """The tokenizer stored in a checkpoint folder (Checkpoint.folder); BadFile naming a tokenizer file the library
    cannot read, or a chat template that does not parse."""
    file = tokenizer_file(folder)
    if file.name == "tokenizer.json":
        kind, what = HFTokenizer, "tokenizers tokenizer.json"
    elif re.match(rb"[A-Za-z0-9+/=]+ \d+\n", file.read_bytes()[:256]):
        kind, what = TiktokenTokenizer, "tiktoken file (a base64 token and its rank per line)"
    else:
        kind, what = SentencePieceTokenizer, "sentencepiece model"
    for name in TOKENIZER_FILES:
        if (file.parent / name).is_file():
            verify(file.parent / name)
    try:
        tok = kind(file.parent)
    except BadFile:
        raise
    except Exception as e:  # each library's own errors (tokenizers: Exception; sentencepiece: RuntimeError, ...)
        raise BadFile(file, f"cannot be read as a {what} ({first_line(e)})", REMAKE) from None
    if tok.chat_template is not None:
        import jinja2

        try:
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(tok.chat_template)
        except jinja2.TemplateSyntaxError as e:
            source = file.parent / "chat_template.jinja"
            source = source if source.is_file() else file.parent / "tokenizer_config.json"
            raise BadFile(source, f"its chat template does not parse ({first_line(e)}, line {e.lineno})",
                          "fix the template or convert the model again with scripts/prepare.sh") from None
    return tok
