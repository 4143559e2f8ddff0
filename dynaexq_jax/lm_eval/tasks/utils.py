"""Loaders of the local task suite (lm-eval `custom_dataset`): a task's JSONL beside this file as
a one-split dataset, read without any download (HF_DATASETS_OFFLINE=1 works)."""
import json
from pathlib import Path

DATA = Path(__file__).parent / "data"


def load(file: str, **metadata):
    """file: data/<file>.jsonl -> {"test": Dataset}. metadata: lm-eval's (model args, ...), unused."""
    import datasets
    rows = [json.loads(line) for line in (DATA / f"{file}.jsonl").read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
