"""Documents of fastllama's local lm-eval tasks, read from files in this repository (works offline, from any folder)."""
import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def facts(**kwargs) -> datasets.DatasetDict:
    """40 general-knowledge questions with four choices (facts.jsonl, written for this project)."""
    rows = [json.loads(line) for line in (HERE / "facts.jsonl").read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def paragraphs(**kwargs) -> datasets.DatasetDict:
    """The paragraphs of data/perplexity.txt (Python's reference documentation) that have 200+ characters."""
    text = (HERE.parent.parent / "data" / "perplexity.txt").read_text()
    rows = [{"text": p.strip()} for p in text.split("\n\n") if len(p.strip()) >= 200]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
