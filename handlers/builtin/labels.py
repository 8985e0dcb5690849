"""``index_to_name.json``: class index -> label, read as TorchServe's ``load_label_mapping`` does.

Accepted: ``{"0": "tench", ...}``; ``{"0": ["n01440764", "tench"], ...}`` (the last element is
the label, as in TorchServe's ImageNet example); ``{"object_type_names": ["a", "b", ...]}``.
Without the file, labels are the class indices as strings ("0", "1", ...).
"""

from __future__ import annotations

import json
from pathlib import Path

MAPPING_FILE = "index_to_name.json"

Labels = dict[str, str] | None


def load_labels(model_dir: Path) -> Labels:
    path = model_dir / MAPPING_FILE
    if not path.is_file():
        return None
    mapping = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(mapping, dict):
        raise ValueError(f'{MAPPING_FILE} must map "class index" to "label"')
    names = mapping.get("object_type_names")
    if isinstance(names, list):
        return {str(index): str(name) for index, name in enumerate(names)}
    labels: dict[str, str] = {}
    for key, value in mapping.items():
        name = value[-1] if isinstance(value, list) and value else value
        if not isinstance(name, str):
            raise ValueError(f"{MAPPING_FILE}: the label of {key!r} must be a string or a list")
        labels[str(key)] = name
    return labels


def label(labels: Labels, index: int) -> str:
    """The label of class `index`; its index as a string when the mapping has no entry (where
    TorchServe fails the whole batch with a KeyError)."""
    key = str(index)
    if labels is None:
        return key
    return labels.get(key, key)
