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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from layers import swap_modules
from model import ModelArgs, Transformer

WEIGHTS_NAME = "model.pth"
QUANTIZATION_MODES = ("int8", "int4", "int4-gptq")
PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # activations
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
        data = json.loads(config.read_text())
        return cls(weights, config, ModelArgs.from_dict(data["model_args"]), Format.from_dict(data.get("format", {})))

    def build(self) -> Transformer:
        """A Transformer on the meta device with the modules this checkpoint's format calls for."""
        return build_model(self.args, self.quantization)

    def state_dict(self, map_location="cpu") -> dict:
        """The weights, memory-mapped and loaded without unpickling arbitrary objects."""
        return torch.load(self.weights, map_location=map_location, mmap=True, weights_only=True)


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
    tmp = weights.with_suffix(".pth.tmp")
    torch.save(state_dict, tmp)
    tmp.replace(weights)  # never leave a half-written model.pth behind
    fmt_dict = {k: v for k, v in asdict(fmt).items() if v is not None}
    config = {"model_args": args.to_dict(), "format": fmt_dict}
    config_path(weights).write_text(json.dumps(config, indent=2) + "\n")
    return weights


def validate_state_dict(state_dict: dict, args: ModelArgs, quantization: Quantization | None) -> None:
    """ValueError unless state_dict has exactly the names and shapes the model of (args, quantization) expects."""
    expected = build_model(args, quantization).state_dict()
    missing, extra = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"weights do not fit the model config: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, t in expected.items():
        if state_dict[name].shape != t.shape:
            raise ValueError(f"{name} has shape {tuple(state_dict[name].shape)}, the config says {tuple(t.shape)}")
