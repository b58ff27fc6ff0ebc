"""Local data of the tokenprune lm-eval tasks: read from the JSON-lines files beside this file.

Used through ``custom_dataset: !function data.<name>`` in the task YAMLs, so lm-eval never calls
``datasets.load_dataset`` and nothing is downloaded.
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, **_):
    import datasets

    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def facts(**kwargs):
    return _load("facts.jsonl", **kwargs)


def qa(**kwargs):
    return _load("qa.jsonl", **kwargs)
