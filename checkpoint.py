"""The on-disk checkpoint format: one place that writes it and one place that reads it.

A checkpoint directory holds
  model.pth           the state dict, named as in model.py (torch.save; read with weights_only=True)
  model_config.json   {"model_args": ModelArgs fields, "format": {"dtype": ..., "source": ..., "quantization": ...}}
plus the tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json) beside them.
Quantized weights sit beside the float ones as model_<mode>.pth with model_<mode>_config.json:
every weights file X.pth has its config in X_config.json. The loader reads the config from there,
never from a file or folder name.
"""
import json
from pathlib import Path

import torch

from model import ModelArgs, Transformer

WEIGHTS_NAME = "model.pth"


def config_path(weights: Path) -> Path:
    """The config file of a weights file: model.pth -> model_config.json."""
    return weights.with_name(f"{weights.stem}_config.json")


def build_model(args: ModelArgs, fmt: dict) -> Transformer:
    """A Transformer on the meta device with the modules the checkpoint format calls for."""
    with torch.device("meta"):
        model = Transformer(args)
        if fmt.get("quantization"):
            from quantize import swap_modules

            swap_modules(model, fmt["quantization"])
    return model


def save_checkpoint(out_dir: Path, state_dict: dict, args: ModelArgs, fmt: dict, weights_name: str = WEIGHTS_NAME) -> Path:
    """Write state_dict and its config (model args plus format facts such as dtype) into out_dir."""
    validate_state_dict(state_dict, args, fmt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / weights_name
    tmp = weights.with_suffix(".pth.tmp")
    torch.save(state_dict, tmp)
    tmp.replace(weights)  # never leave a half-written model.pth behind
    config = {"model_args": args.to_dict(), "format": fmt}
    config_path(weights).write_text(json.dumps(config, indent=2) + "\n")
    return weights


def validate_state_dict(state_dict: dict, args: ModelArgs, fmt: dict) -> None:
    """ValueError unless state_dict has exactly the names and shapes the model of (args, fmt) expects."""
    expected = build_model(args, fmt).state_dict()
    missing, extra = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"weights do not fit the model config: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, t in expected.items():
        if state_dict[name].shape != t.shape:
            raise ValueError(f"{name} has shape {tuple(state_dict[name].shape)}, the config says {tuple(t.shape)}")


def checkpoint_files(checkpoint_path: Path) -> tuple[Path, Path]:
    """(weights file, config file) for a checkpoint directory or its model.pth; ValueError if missing."""
    path = Path(checkpoint_path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    config = config_path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {weights}; prepare one with `scripts/prepare.sh` "
            "(no argument: the default model; or a Hugging Face repo id or a local folder)"
        )
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing; re-run scripts/prepare.sh to convert the checkpoint again")
    return weights, config


def read_config(checkpoint_path: Path) -> tuple[ModelArgs, dict]:
    """The ModelArgs and format dict stored beside a checkpoint."""
    _, config = checkpoint_files(checkpoint_path)
    data = json.loads(config.read_text())
    return ModelArgs.from_dict(data["model_args"]), data.get("format", {})


def load_state_dict(checkpoint_path: Path, map_location="cpu") -> dict:
    """The state dict of a checkpoint, loaded without unpickling arbitrary objects."""
    weights, _ = checkpoint_files(checkpoint_path)
    return torch.load(weights, map_location=map_location, mmap=True, weights_only=True)
