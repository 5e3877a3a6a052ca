"""A stand-in for the part of Hugging Face `datasets` that diffusers' train_text_to_image_sdxl.py uses (see
bench/stand_ins/README.md): rows in Python lists, on the host. Semantics follow datasets': `map` calls the function
on batches of the formatted (with_transform'ed) rows and keeps the stored columns plus what the function returns;
`dataset[i]` is the transform applied to a batch of one row."""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from . import fingerprint, utils  # noqa: F401 (datasets.fingerprint.Hasher, datasets.utils.logging)

__version__ = "stand-in"


class Dataset:
    def __init__(self, columns: dict[str, list], transform=None):
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths: { {k: len(v) for k, v in columns.items()} }")
        self._columns, self._transform = columns, transform

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return len(next(iter(self._columns.values()), []))

    def _batch(self, start: int, stop: int) -> dict:
        batch = {name: values[start:stop] for name, values in self._columns.items()}
        return self._transform(batch) if self._transform else batch

    def __getitem__(self, key):
        if isinstance(key, str):
            return list(self._columns[key])
        batch = self._batch(key, key + 1)
        return {name: values[0] for name, values in batch.items()}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def with_transform(self, transform) -> "Dataset":
        return Dataset(self._columns, transform)

    def map(self, function, batched: bool = False, batch_size: int | None = 1000, **_ignored) -> "Dataset":
        if not batched:
            raise NotImplementedError("the stand-in maps batches only (batched=True)")
        size = len(self) if not batch_size or batch_size < 0 else batch_size
        added: dict[str, list] = {}
        for start in range(0, len(self), size):
            for name, values in function(self._batch(start, start + size)).items():
                added.setdefault(name, []).extend(values)
        return Dataset({**self._columns, **added})

    def remove_columns(self, names) -> "Dataset":
        names = [names] if isinstance(names, str) else list(names)
        return Dataset({k: v for k, v in self._columns.items() if k not in names}, self._transform)

    def shuffle(self, seed=None) -> "Dataset":
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        return self.select(order)

    def select(self, indices) -> "Dataset":
        indices = list(indices)
        return Dataset({k: [v[i] for i in indices] for k, v in self._columns.items()}, self._transform)


class DatasetDict(dict):
    pass


def concatenate_datasets(datasets: list[Dataset], axis: int = 0) -> Dataset:
    if axis == 1:
        columns: dict[str, list] = {}
        for dataset in datasets:
            columns.update(dataset._columns)
        return Dataset(columns)
    names = datasets[0].column_names
    return Dataset({name: [row for d in datasets for row in d._columns[name]] for name in names})


def load_dataset(path: str, name=None, data_files: dict | None = None, cache_dir=None, data_dir=None, **_ignored):
    """Only the "imagefolder" builder on local files: images (sorted by path) with the `text` of each from the
    folder's metadata.jsonl ({"file_name": ..., "text": ...} per line)."""
    if path != "imagefolder" or not data_files:
        raise NotImplementedError(f"the stand-in loads a local imagefolder only, not {path!r}")
    splits = DatasetDict()
    for split, pattern in data_files.items():
        folder = Path(str(pattern).removesuffix("**")).resolve()
        captions = {}
        metadata = folder / "metadata.jsonl"
        if metadata.is_file():
            for line in metadata.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    captions[row["file_name"]] = row
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        columns: dict[str, list] = {"image": [Image.open(p) for p in files]}
        extra = sorted({k for row in captions.values() for k in row if k != "file_name"})
        for key in extra:
            columns[key] = [captions.get(str(p.relative_to(folder)), {}).get(key) for p in files]
        splits[split] = Dataset(columns)
    return splits
