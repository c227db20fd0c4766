"""The on-disk checkpoint format: one place that writes it (save_checkpoint) and one that reads it (Checkpoint).

A checkpoint folder holds
  model.pth           the state dict, named as in model.py (torch.save; read with weights_only=True)
  model_config.json   {"model_args": ModelArgs fields, "format": Format fields}
plus the tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json) beside them.
Quantized weights sit beside the float ones as model_<mode>.pth with model_<mode>_config.json:
every weights file X.pth has its config in X_config.json. The loader reads the config from there,
never from a file or folder name.
"""
import json
import pickle
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import files
import kernels
from files import REMAKE, BadFile, check_zip, first_line, read_json, written
from layers import swap_modules
from model import ModelArgs, Transformer

WEIGHTS_NAME = "model.pth"
REQUANTIZE = "make it again with quantize.py from the float checkpoint"
QUANTIZATION_MODES = ("int8", "int4", "int4-gptq")
PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # activations
KV_DTYPES = {**PRECISIONS, "int8": torch.int8}  # the KV cache's storage (int8: a scale per block, model.KVCache)
# written by earlier versions and no longer read; accepted in old files, never written
_RETIRED_FORMAT_KEYS = {"gguf_file", "gguf_tensor_types", "model_type", "quantized_from"}
_RETIRED_QUANTIZATION_KEYS = {"embedding", "output"}


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint's linear layers are quantized (layers.py has their layouts)."""
    mode: str  # int8 | int4 | int4-gptq (int4 made with GPTQ)
    groupsize: int | None = None  # int4: inputs per (scale, zero); None for int8
    int8_groupsize: int | None = None  # int8 layers (int4's embedding and output too): None per channel, 32 per block

    def __post_init__(self):
        if self.mode not in QUANTIZATION_MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; known: {', '.join(QUANTIZATION_MODES)}")

    @property
    def kind(self) -> str:
        """The weights' type: "int8" or "int4"."""
        return "int8" if self.mode == "int8" else "int4"


@dataclass(frozen=True)
class Format:
    """What a weights file holds besides the model's shape."""
    dtype: str  # the float weights' dtype as stored ("float32", "bfloat16", ...), or the source's for quantized ones
    source: str  # "huggingface", "gguf", ...
    name: str | None = None  # the model's own name where the source gives one (GGUF general.name)
    quantization: Quantization | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Format":
        """From a config file's "format" entry; ValueError naming a field we do not know."""
        d = {k: v for k, v in d.items() if k not in _RETIRED_FORMAT_KEYS}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown checkpoint format fields {sorted(unknown)}")
        q = d.pop("quantization", None)
        if q is not None:
            q = Quantization(**{k: v for k, v in q.items() if k not in _RETIRED_QUANTIZATION_KEYS})
        return cls(**d, quantization=q)

    def describe(self) -> str:
        """One line for people: the weights' type and where they came from."""
        q = self.quantization
        what = self.dtype if q is None else q.mode + (f" g{q.groupsize}" if q.groupsize else "")
        return f"{what} weights from {self.source}" + (f" ({self.name})" if self.name else "")


def resolve_precision(precision: str, quantization: Quantization | None, device: torch.device) -> str:
    """--precision, with "auto" made concrete: bf16 for float checkpoints; for int8 / int4 ones fp32 on a CPU (the
    kernels compute in float32, so bf16 would only add conversions) and bf16 on CUDA (torch's int4 kernel needs it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "fp32" if quantization is not None and device.type == "cpu" else "bf16"


def resolve_kv_dtype(kv_dtype: str, precision: str, quantization: Quantization | None, device: torch.device) -> str:
    """--kv_dtype, with "auto" made concrete for activations in `precision` (resolved): int8 for int8 / int4
    checkpoints on a CPU that runs kernels.cpp's attention (AVX2): a quarter of the bytes each decode step reads, 1.4x
    the tokens/s at 16 rows of the default model, perplexity +0.1% (docs/kernels.md); elsewhere the activations' own
    dtype, the exact mode, which float checkpoints keep so that they give transformers' logits."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown --kv_dtype {kv_dtype!r}; choose from {', '.join(KV_DTYPES)}")
    if kv_dtype != "auto":
        return kv_dtype
    return "int8" if quantization is not None and device.type == "cpu" and kernels.this_cpu().avx2 else precision


def kv_dtype_name(model: Transformer) -> str:
    """The KV_DTYPES name of how a model's KV cache stores keys and values (its activations' dtype unless set)."""
    return next(k for k, v in KV_DTYPES.items() if v == (model.kv_dtype or model.dtype))


def config_path(weights: Path) -> Path:
    """The config file of a weights file: model.pth -> model_config.json."""
    return weights.with_name(f"{weights.stem}_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint resolved once: its files, its ModelArgs and its Format."""
    weights: Path
    config_file: Path
    args: ModelArgs
    format: Format

    @property
    def folder(self) -> Path:
        """The folder of the weights file, which also holds the tokenizer files."""
        return self.weights.parent

    @property
    def quantization(self) -> Quantization | None:
        return self.format.quantization

    @classmethod
    def open(cls, path) -> "Checkpoint":
        """The checkpoint at path: a folder (its model.pth) or a weights file; FileNotFoundError when missing."""
        if isinstance(path, Checkpoint):
            return path
        path = Path(path)
        weights = path / WEIGHTS_NAME if path.is_dir() else path
        config = config_path(weights)
        if not weights.is_file():
            raise FileNotFoundError(
                f"no checkpoint at {weights}; prepare one with `scripts/prepare.sh` "
                "(no argument: the default model; or a Hugging Face repo id or a local folder)")
        if not config.is_file():
            raise FileNotFoundError(f"{config} is missing; re-run scripts/prepare.sh to convert the checkpoint again")
        files.verify(config)
        data = read_json(config, REMAKE)
        if not isinstance(data.get("model_args"), dict):
            raise BadFile(config, "not a fastllama model config (no model_args)", REMAKE)
        try:
            args = ModelArgs.from_dict(data["model_args"])
            fmt = Format.from_dict(data.get("format") or {})
            build_model(args, fmt.quantization)  # sizes that make no model fail here, on the meta device
        except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
            raise BadFile(config, f"not a usable model config ({first_line(e)})", REMAKE) from None
        return cls(weights, config, args, fmt)

    def build(self) -> Transformer:
        """A Transformer on the meta device with the modules this checkpoint's format calls for."""
        return build_model(self.args, self.quantization)

    def state_dict(self, map_location="cpu") -> dict:
        """The weights, memory-mapped and loaded without unpickling arbitrary objects; BadFile when the file is cut
        short or damaged (files.check_zip) or its tensors are not the config's."""
        fix = REQUANTIZE if self.quantization is not None and self.format.source != "gguf" else REMAKE
        check_zip(self.weights, fix)
        try:
            sd = torch.load(self.weights, map_location=map_location, mmap=True, weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
            raise BadFile(self.weights, f"cannot be read ({first_line(e)})", fix) from None
        if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
            raise BadFile(self.weights, "not a state dict of tensors", fix)
        try:
            validate_state_dict(tie_state_dict(sd, self.args), self.args, self.quantization)
        except ValueError as e:
            raise BadFile(self.weights, f"does not match {self.config_file.name}: {e}", fix) from None
        return sd


def build_model(args: ModelArgs, quantization: Quantization | None = None) -> Transformer:
    """A Transformer on the meta device, its layers swapped for the quantized ones when quantization is given."""
    with torch.device("meta"):
        model = Transformer(args)
        if quantization is not None:
            swap_modules(model, quantization)
            if args.tie_embeddings:
                model.tie_weights()
    return model


def tie_state_dict(sd: dict, args: ModelArgs) -> dict:
    """A tied model's state dict with its output layer's tensors the embedding's (torch.save stores them once)."""
    if not args.tie_embeddings:
        return sd
    out = {k: v for k, v in sd.items() if not k.startswith("output.")}
    emb = {k.removeprefix("tok_embeddings."): v for k, v in sd.items() if k.startswith("tok_embeddings.")}
    out.update({f"output.{k}": v for k, v in emb.items()})
    return out


def save_checkpoint(out_dir: Path, state_dict: dict, args: ModelArgs, fmt: Format,
                    weights_name: str = WEIGHTS_NAME) -> Path:
    """Write state_dict (a tied model's output tensors may be left out) and its config into out_dir."""
    state_dict = tie_state_dict(state_dict, args)
    validate_state_dict(state_dict, args, fmt.quantization)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / weights_name
    fmt_dict = {k: v for k, v in asdict(fmt).items() if v is not None}
    config = {"model_args": args.to_dict(), "format": fmt_dict}
    # each file whole or not at all (files.written); the config last, so that a config names finished weights
    with written(weights) as tmp:
        torch.save(state_dict, tmp)
    files.write_text(config_path(weights), json.dumps(config, indent=2) + "\n")
    files.record(config_path(weights))
    return weights


def validate_state_dict(state_dict: dict, args: ModelArgs, quantization: Quantization | None) -> None:
    """ValueError unless state_dict has exactly the names and shapes the model of (args, quantization) expects."""
    expected = build_model(args, quantization).state_dict()
    missing, extra = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{len(missing)} tensors missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}")
    bad = [f"{name} {tuple(state_dict[name].shape)} {state_dict[name].dtype} (config: {tuple(t.shape)} {t.dtype})"
           for name, t in expected.items() if state_dict[name].shape != t.shape
           or state_dict[name].dtype.is_floating_point != t.dtype.is_floating_point
           or (not t.dtype.is_floating_point and state_dict[name].dtype != t.dtype)]
    if bad:
        raise ValueError(f"{len(bad)} tensors of another shape or dtype: {'; '.join(bad[:3])}")
