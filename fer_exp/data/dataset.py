"""The in-memory dataset: one uint8 tensor per split, labels and the source id of every sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fer_exp.classes import CLASS_NAMES, NUM_CLASSES

SPLIT_NAMES = ("train", "val", "test")
# the earlier splits a face of val or test may copy (FER2013's copies run from test and val back to train)
EARLIER = {"val": ("train",), "test": ("train", "val")}
CORRELATED = tuple(f"{later}|{name}" for later, names in EARLIER.items() for name in names)  # val|train, ...


class DataError(Exception):
    """Bad or unusable input data. The message names the file or row and what was expected."""


@dataclass
class Split:
    """One split: ``images`` uint8 (N, 48, 48), ``labels`` int64 (N,), ``sources`` N ids."""

    images: torch.Tensor
    labels: torch.Tensor
    sources: list[str]

    def __post_init__(self) -> None:
        n = len(self.sources)
        if self.images.dtype != torch.uint8 or self.images.ndim != 3 or self.images.shape[0] != n:
            raise ValueError(f"images must be uint8 (N, H, W) with N={n}, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (n,):
            raise ValueError(f"labels must be int64 ({n},), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.sources)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=NUM_CLASSES).tolist()

    def digest(self) -> str:
        """A content digest of the split (every pixel and label), so runs on different data tell apart."""
        import hashlib

        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()[:12]

    def members_digest(self) -> str:
        """A digest of which samples the split holds and their labels (source ids, not pixels: another
        machine's image decoder may differ by a grey level and still hold the same faces)."""
        import hashlib

        digest = hashlib.sha256("\n".join(self.sources).encode())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()[:12]

    def subset(self, index: torch.Tensor) -> "Split":
        index = torch.as_tensor(index, dtype=torch.int64)
        return Split(self.images[index], self.labels[index], [self.sources[i] for i in index.tolist()])

    @staticmethod
    def concat(parts: list["Split"]) -> "Split":
        return Split(
            torch.cat([p.images for p in parts]),
            torch.cat([p.labels for p in parts]),
            [s for p in parts for s in p.sources],
        )

    @staticmethod
    def empty(size: int = 48) -> "Split":
        return Split(torch.empty(0, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), [])


@dataclass
class DecodeReport:
    """What decoding did beyond the plain case, so that nothing is changed or dropped silently."""

    converted_to_gray: int = 0
    resized: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    ignored: list[str] = field(default_factory=list)  # hidden files such as .DS_Store

    def merge(self, other: "DecodeReport") -> None:
        self.converted_to_gray += other.converted_to_gray
        self.resized += other.resized
        self.skipped += other.skipped
        self.ignored += other.ignored


@dataclass
class FerData:
    """The three splits of one data source, and how they were obtained."""

    train: Split
    val: Split
    test: Split
    source: str
    format: str  # "csv" | "folder" | "synthetic"
    split_rule: str
    report: DecodeReport = field(default_factory=DecodeReport)
    from_cache: bool = False
    load_seconds: float = 0.0
    duplicates_dropped: dict[str, int] = field(default_factory=dict)  # per split, by duplicates: drop
    # faces count as copies across splits where their pixels are identical (1) or correlate at least this much
    copy_correlation: float = 1.0

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def fingerprint(self) -> dict[str, dict[str, str]]:
        """Per split, the digest of its members (which faces, which labels) and of its pixels."""
        return {"members": self.members(), "pixels": {name: split.digest() for name, split in self.splits().items()}}

    def members(self) -> dict[str, str]:
        """Per split, the digest of its members alone (no pass over the pixels)."""
        return {name: split.members_digest() for name, split in self.splits().items()}

    def duplicates_across_splits(self) -> dict[str, dict]:
        """Faces of a later split (val, test) whose pixels are identical to a face of an earlier one (train,
        val): FER2013 holds such copies, which inflate val and test a little. Per pair (``val in train``,
        ``test in train``, ``test in val``): how many, how many of those with another label, two examples.
        Found once per data (every run's summary asks, and a tuning worker's trials share one FerData)."""
        if "_duplicates" not in self.__dict__:
            self.__dict__["_duplicates"] = self._find_duplicates()
        return self.__dict__["_duplicates"]

    def _keys(self, name: str) -> dict[bytes, list[int]]:
        """:func:`pixel_keys` of one split, hashed once per data."""
        cached = self.__dict__.setdefault("_pixel_keys", {})
        if name not in cached:
            cached[name] = pixel_keys(self.splits()[name])
        return cached[name]

    def _find_duplicates(self) -> dict[str, dict]:
        splits = self.splits()
        keys = {name: self._keys(name) for name in splits}
        found = {}
        for later, earlier in (("val", "train"), ("test", "train"), ("test", "val")):
            copies, relabelled, examples = 0, 0, []
            for key, rows in keys[later].items():
                if key not in keys[earlier]:
                    continue
                theirs = keys[earlier][key][0]
                for row in rows:
                    copies += 1
                    relabelled += int(splits[later].labels[row]) != int(splits[earlier].labels[theirs])
                    if len(examples) < 2:
                        examples.append(f"{splits[later].sources[row]} = {splits[earlier].sources[theirs]}")
            if copies:
                found[f"{later} in {earlier}"] = {"images": copies, "other_label": relabelled, "examples": examples}
        return found

    def copied(self, split: str) -> np.ndarray:
        """Per face of ``split`` (val or test), whether the source's earlier splits (train; for test, train
        or val) hold a copy of it: a face with its pixels, or, where ``copy_correlation`` is below 1, one
        whose pixels correlate with its at least that much (the same photo cropped or recompressed).
        Kept as the source had them when ``duplicates: drop`` leaves the copies out of train and val (for
        the val faces it keeps), so every run on one source scores the same test faces apart
        (``test_accuracy_uncopied``), whether it trained on their copies or not."""
        return self._copy_kinds(split) > 0

    def _copy_kinds(self, split: str) -> np.ndarray:
        """Per face of ``split``: 0 no copy in an earlier split, 1 a pixel-identical one, 2 only a near one
        (correlation >= ``copy_correlation``, where that is below 1). Once per data, kept through drop."""
        cached = self.__dict__.setdefault("_kinds_cache", {})
        if split not in cached:
            kinds = self._identical_to(split, set().union(*(self._keys(name).keys() for name in EARLIER[split])))
            kinds = kinds.astype(np.int8)
            if self.copy_correlation < 1:
                best, _, _ = self._closest_earlier(split)
                kinds[(kinds == 0) & (best >= self.copy_correlation).numpy()] = 2
            cached[split] = kinds
        return cached[split]

    def _correlations(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per pair ``later|earlier`` of val|train, test|train, test|val: for each face of ``later`` the
        highest Pearson correlation of its pixels with a face of ``earlier`` (``best``) and that face's row
        (``where``); for each face of ``earlier``, its highest with a face of ``later`` (``best_back``).
        Every pair of faces is correlated (6-14 s for FER2013 on two cores), so only where asked: once per
        data, and saved in the cache under the splits' content digests, so later runs on it read them."""
        if "_correlations_cache" not in self.__dict__:
            import hashlib

            from fer_exp.data import cache

            splits = self.splits()
            key = hashlib.sha256("|".join(split.digest() for split in splits.values()).encode()).hexdigest()[:24]
            found = cache.load_blob(key, "correlations")

            def fits(pair: str) -> bool:  # a saved blob as this data's would be (else computed again)
                later, earlier = (len(splits[name]) for name in pair.split("|"))
                entry = found.get(pair) if isinstance(found, dict) else None
                return isinstance(entry, dict) and all(isinstance(entry.get(k), torch.Tensor) for k in ("best", "where", "best_back")) \
                    and len(entry["best"]) == len(entry["where"]) == later and len(entry["best_back"]) == earlier

            if not all(fits(pair) for pair in CORRELATED):
                found = self._compute_correlations()
                cache.save_blob(key, "correlations", found)
            self.__dict__["_correlations_cache"] = found
        return self.__dict__["_correlations_cache"]

    def _compute_correlations(self, chunk: int = 512) -> dict[str, dict[str, torch.Tensor]]:
        def standardised(images: torch.Tensor) -> torch.Tensor:
            flat = images.flatten(1).float()
            flat = flat - flat.mean(1, keepdim=True)
            return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)  # a flat image correlates with nothing

        scaled = {name: standardised(split.images) for name, split in self.splits().items()}  # each split once
        found = {}
        for pair in CORRELATED:
            later, earlier = pair.split("|")
            faces, others = scaled[later], scaled[earlier]
            best, where = torch.full((len(faces),), -1.0), torch.zeros(len(faces), dtype=torch.int64)
            best_back = torch.full((len(others),), -1.0)
            if len(faces) and len(others):
                for start in range(0, len(faces), chunk):
                    block = faces[start:start + chunk] @ others.T
                    best[start:start + chunk], where[start:start + chunk] = block.max(1)
                    best_back = torch.maximum(best_back, block.max(0).values)
            found[pair] = {"best": best, "where": where, "best_back": best_back}
        return found

    def _identical_to(self, name: str, keys) -> np.ndarray:
        """Per face of split ``name``, whether its pixels' key is among ``keys`` (a face of another split)."""
        mask = np.zeros(len(self.splits()[name]), dtype=bool)
        for key, rows in self._keys(name).items():
            mask[rows] = key in keys
        return mask

    def _closest_earlier(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per face of ``split``: its highest correlation with a face of an earlier split, which split that
        face is in (an index into ``EARLIER[split]``), and its row there."""
        found = [self._correlations()[f"{split}|{name}"] for name in EARLIER[split]]
        best, which = torch.stack([f["best"] for f in found]).max(0)
        where = torch.stack([f["where"] for f in found]).gather(0, which[None])[0]
        return best, which, where

    def near_copies(self) -> dict[str, dict]:
        """The faces of val and test that are copies only by ``copy_correlation`` (below 1): not identical
        to a face of an earlier split but correlating with one at least that much. Per split: how many of
        its faces (after ``duplicates: drop``, of the val faces it keeps), and two examples with their
        correlation; none at 1."""
        found = {}
        if self.copy_correlation < 1:
            examples = self._near_examples()
            for split in ("val", "test"):
                rows = np.flatnonzero(self._copy_kinds(split) == 2)
                sources = self.splits()[split].sources
                found[split] = {"images": len(rows), "examples": [examples[split][sources[i]] for i in rows[:2]]}
        return found

    def _near_examples(self) -> dict[str, dict[str, str]]:
        """Per split, per near-copy's source id: 'face ~ the face it nearly copies (correlation)'. Found on
        the source (the faces it nearly copies may be dropped later), kept through drop."""
        if "_near_examples_cache" not in self.__dict__:
            found = {}
            for split in ("val", "test"):
                rows = np.flatnonzero(self._copy_kinds(split) == 2)
                best, which, where = self._closest_earlier(split) if len(rows) else (None, None, None)
                sources = self.splits()[split].sources
                found[split] = {sources[i]: f"{sources[i]} ~ {self.splits()[EARLIER[split][int(which[i])]].sources[int(where[i])]} "
                                            f"({float(best[i]):.3f})" for i in rows}
            self.__dict__["_near_examples_cache"] = found
        return self.__dict__["_near_examples_cache"]

    def without_duplicates(self) -> "FerData":
        """The data with the cross-split copies dropped where they leak: every train face that copies a val
        or test face, and every val face that copies a test face (identical pixels, or correlating at
        least ``copy_correlation`` where that is below 1). Test stays whole (the benchmark's own faces), so
        none of its faces is trained on or selects the epoch; where val is a hold-out of train, the copies
        of a val face left in train are dropped too."""
        import dataclasses

        test_keys = self._keys("test").keys()
        drop_train = self._identical_to("train", test_keys | self._keys("val").keys())
        drop_val = self._identical_to("val", test_keys)
        if self.copy_correlation < 1:
            found = self._correlations()
            drop_train |= ((found["val|train"]["best_back"] >= self.copy_correlation)
                           | (found["test|train"]["best_back"] >= self.copy_correlation)).numpy()
            drop_val |= (found["test|val"]["best_back"] >= self.copy_correlation).numpy()
        kept_val = torch.from_numpy(np.flatnonzero(~drop_val))
        train, val = self.train.subset(torch.from_numpy(np.flatnonzero(~drop_train))), self.val.subset(kept_val)
        dropped = {"train": len(self.train) - len(train), "val": len(self.val) - len(val)}
        for name, split in (("train", train), ("val", val)):
            if len(split) == 0:
                raise DataError(f"every {name} face is a copy of a later split's face, so dropping the copies "
                                f"(duplicates: drop) leaves no {name} split; use duplicates: report")
        copying = "identical to" if self.copy_correlation >= 1 else f"identical or correlating >= {self.copy_correlation:g} with"
        rule = (f"{self.split_rule}; dropped {dropped['train']} train face(s) {copying} a val or test face and "
                f"{dropped['val']} val face(s) {copying} a test face (duplicates: drop)")
        kinds = {"test": self._copy_kinds("test"), "val": self._copy_kinds("val")[kept_val.numpy()]}  # as in the source
        dropped_data = dataclasses.replace(self, train=train, val=val, split_rule=rule, duplicates_dropped=dropped)
        dropped_data.__dict__["_kinds_cache"] = kinds
        if self.copy_correlation < 1:
            dropped_data.__dict__["_near_examples_cache"] = self._near_examples()
        return dropped_data

    def missing_train_classes(self) -> list[str]:
        """The classes train has no image of (a model trained on it can never predict them)."""
        return [name for name, count in zip(CLASS_NAMES, self.train.class_counts()) if count == 0]

    def summary(self) -> dict:
        """A JSON-friendly description: format, split rule, per-split x per-class counts, imbalance."""
        counts = {name: dict(zip(CLASS_NAMES, split.class_counts())) for name, split in self.splits().items()}
        train_counts = [c for c in self.train.class_counts() if c > 0]
        imbalance = max(train_counts) / min(train_counts) if train_counts else float("nan")
        return {
            "source": self.source,
            "format": self.format,
            "split_rule": self.split_rule,
            "image_size": list(self.train.images.shape[1:]),
            "sizes": {name: len(split) for name, split in self.splits().items()},
            "class_counts": counts,
            "imbalance_ratio": round(imbalance, 2),  # among the classes train has
            "missing_train_classes": self.missing_train_classes(),
            "duplicates_across_splits": self.duplicates_across_splits(),
            "duplicates_dropped": self.duplicates_dropped,
            # per split, the faces with a copy in an earlier split of the source (kept through duplicates: drop)
            "faces_with_copies": {name: int(self.copied(name).sum()) for name in ("val", "test")},
            "copy_correlation": self.copy_correlation,
            **({"near_copies": self.near_copies()} if self.copy_correlation < 1 else {}),
            "converted_to_gray": self.report.converted_to_gray,
            "resized": self.report.resized,
            "skipped": [{"where": w, "why": y} for w, y in self.report.skipped],
            "ignored": self.report.ignored,
            "from_cache": self.from_cache,
            "load_seconds": round(self.load_seconds, 3),
        }


def pixel_keys(split: Split) -> dict[bytes, list[int]]:
    """The rows of ``split`` by a hash of their pixels: identical faces share a key."""
    import hashlib

    index: dict[bytes, list[int]] = {}
    for i, row in enumerate(split.images.flatten(1).numpy()):
        index.setdefault(hashlib.blake2b(row.tobytes(), digest_size=16).digest(), []).append(i)
    return index


def missing_classes_warning(missing: list[str], format: str = "folders") -> str:
    """What to tell a user whose train split (of a source of ``format``) lacks ``missing`` classes."""
    why = {"synthetic": "too few synthetic faces to draw every class: give more, e.g. synthetic:1000,200,200",
           "csv": "the CSV has no Training rows of it"}.get(format, "is a class folder empty or misnamed?")
    return (f"train has no images of {', '.join(missing)}: a model trained on it never predicts "
            f"{'that class' if len(missing) == 1 else 'those classes'} ({why})")
