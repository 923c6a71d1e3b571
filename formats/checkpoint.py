"""Resolve a Hugging Face checkpoint (one safetensors file or a sharded set) into one tensor map.

Accepted sources, in the order a folder is tried::

    model.safetensors                       a single file (any *.safetensors path works)
    model.safetensors.index.json            transformers' shard index: {"weight_map": {name: shard}}
    folder/model.safetensors                a folder holding one of the above ...
    folder/*.safetensors.index.json         ... or exactly one index of another name ...
    folder/*.safetensors                    ... or a set of shards without an index

Pickle checkpoints (pytorch_model.bin, *.pt, *.pth, *.ckpt) are refused, never loaded:
unpickling runs code chosen by whoever made the file.

Every shard's header is read and validated at open, so a bad checkpoint fails before any
work starts; the data is only mapped when a tensor from that shard is read.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from ggforge.formats.errors import FormatError
from ggforge.formats.safetensors import SafetensorsFile, TensorEntry, load_json_object

log = logging.getLogger(__name__)

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_INDEX_BYTES = 100_000_000
_SHARD_NAME = re.compile(r"-\d+-of-\d+\.safetensors$")


def _refuse_pickle(what: Path) -> FormatError:
    return FormatError(
        f"{what}: ggforge refuses PyTorch pickle checkpoints (.bin/.pt/.pth/.ckpt) because"
        " loading them can run arbitrary code. Convert the model to safetensors first, e.g."
        " in Python with transformers: AutoModelForCausalLM.from_pretrained(folder)"
        ".save_pretrained(out_folder, safe_serialization=True)")


def _shard_path(index_path: Path, model_dir: Path, name: object) -> Path:
    """The shard file an index names; it must be a plain relative path inside the folder.

    Only the name is checked, not symlink targets: the Hugging Face cache links snapshot
    files to blobs elsewhere, and following links is the user's choice, not the file's.
    """
    if not isinstance(name, str) or not name:
        raise FormatError(f"{index_path}: weight_map names the shard {name!r}, not a file name")
    posix, win = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or win.is_absolute() or win.drive or win.root:
        raise FormatError(f"{index_path}: shard {name!r} is an absolute path;"
                          " shards must lie inside the model folder")
    if ".." in posix.parts or ".." in win.parts:
        raise FormatError(f"{index_path}: shard {name!r} escapes the model folder with '..'")
    return model_dir / name


def _read_index(index_path: Path) -> dict[str, str]:
    """weight_map of a shard index: tensor name -> shard file name, validated."""
    try:
        size = index_path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise FormatError(f"{index_path}: index is {size} bytes, over the"
                              f" {MAX_INDEX_BYTES}-byte limit")
        raw = index_path.read_bytes()
    except OSError as e:
        raise FormatError(f"{index_path}: cannot read: {e.strerror or e}") from None
    index = load_json_object(index_path, raw, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index_path}: shard index has no \"weight_map\" object"
                          " (expected transformers' model.safetensors.index.json)")
    if not weight_map:
        raise FormatError(f"{index_path}: weight_map lists no tensors")
    return weight_map


class Checkpoint:
    """All tensors of a checkpoint, merged over its shards (shard order, then header order)."""

    def __init__(self, model_dir: Path, shards: list[SafetensorsFile]):
        self.model_dir = model_dir  # holds config.json and the tokenizer files
        self.files = [Path(s.path) for s in shards]
        self._shards = shards
        self._owner: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorEntry] = {}
        for shard in shards:
            for name, entry in shard.tensors.items():
                if name in self._owner:
                    raise FormatError(f"tensor {name!r} is in two shards:"
                                      f" {self._owner[name].path} and {shard.path}")
                self._owner[name] = shard
                self.tensors[name] = entry

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(cls, source: str | os.PathLike) -> Checkpoint:
        """Open a .safetensors file, a shard index .json, or a model folder (see module doc)."""
        path = Path(source)
        if path.is_dir():
            return cls._open_dir(path)
        if not path.exists():
            raise FormatError(f"{path}: no such file or folder")
        name = path.name.lower()
        if name.endswith(PICKLE_SUFFIXES):
            raise _refuse_pickle(path)
        if name.endswith(".json"):
            return cls._open_index(path)
        if name.endswith(".safetensors"):
            if _SHARD_NAME.search(path.name):
                log.warning("%s looks like one shard of a set; only its own tensors are read"
                            " (pass the folder or the index to read them all)", path)
            return cls._open_files(path.parent, [path])
        raise FormatError(f"{path}: not a checkpoint ggforge reads; give a .safetensors file,"
                          f" a {INDEX_NAME}, or the model folder")

    @classmethod
    def _open_dir(cls, folder: Path) -> Checkpoint:
        if (folder / SINGLE_NAME).is_file():
            return cls._open_files(folder, [folder / SINGLE_NAME])
        if (folder / INDEX_NAME).is_file():
            return cls._open_index(folder / INDEX_NAME)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise FormatError(f"{folder}: several shard indexes ({', '.join(p.name for p in indexes)});"
                              " pass the one to use")
        if indexes:
            return cls._open_index(indexes[0])
        files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        if files:
            return cls._open_files(folder, files)
        if any(p.name.lower().endswith(PICKLE_SUFFIXES) for p in folder.iterdir()):
            raise _refuse_pickle(folder)
        raise FormatError(f"{folder}: no safetensors files in this folder (expected"
                          f" {SINGLE_NAME} or {INDEX_NAME} with its shards)")

    @classmethod
    def _open_files(cls, model_dir: Path, files: list[Path]) -> Checkpoint:
        shards: list[SafetensorsFile] = []
        try:
            for f in files:
                shards.append(SafetensorsFile.open(f))
            return cls(model_dir, shards)
        except BaseException:
            for s in shards:
                s.close()
            raise

    @classmethod
    def _open_index(cls, index_path: Path) -> Checkpoint:
        model_dir = index_path.parent
        weight_map = _read_index(index_path)
        # Shard order is the sorted file names, as transformers loads them.
        files = sorted({_shard_path(index_path, model_dir, v) for v in weight_map.values()})
        for f in files:
            try:
                present = f.is_file()
            except OSError as e:  # the name comes from the file: too long, a link loop, ...
                raise FormatError(f"{index_path}: shard {f.relative_to(model_dir)} named in"
                                  f" weight_map cannot be opened: {e.strerror or e}") from None
            if not present:
                raise FormatError(f"{index_path}: shard {f.relative_to(model_dir)} is missing"
                                  f" from {model_dir} (incomplete download?)")
        ckpt = cls._open_files(model_dir, files)
        try:
            ckpt._check_against_index(index_path, weight_map, model_dir)
        except BaseException:
            ckpt.close()
            raise
        return ckpt

    def _check_against_index(self, index_path: Path, weight_map: dict, model_dir: Path) -> None:
        """The index and the shards' headers must agree tensor for tensor."""
        for name, shard_name in weight_map.items():
            owner = self._owner.get(name)
            if owner is None:
                raise FormatError(f"{index_path}: tensor {name!r} is listed in shard"
                                  f" {shard_name!r} but no shard holds it")
            if Path(owner.path) != model_dir / shard_name:
                raise FormatError(f"{index_path}: tensor {name!r} is listed in shard"
                                  f" {shard_name!r} but lies in {Path(owner.path).name}")
        for name, owner in self._owner.items():
            if name not in weight_map:
                raise FormatError(f"{owner.path}: tensor {name!r} is not listed in {index_path.name}")

    # -- reading -------------------------------------------------------------------------

    def read(self, name: str) -> np.ndarray:
        """A copy of tensor `name` in its own dtype (see SafetensorsFile.read)."""
        return self._shard_of(name).read(name)

    def read_float32(self, name: str) -> np.ndarray:
        """Tensor `name` as a new float32 array (F32, F16, BF16, F64)."""
        return self._shard_of(name).read_float32(name)

    def _shard_of(self, name: str) -> SafetensorsFile:
        try:
            return self._owner[name]
        except KeyError:
            raise KeyError(f"{self.model_dir}: checkpoint has no tensor named {name!r}") from None

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data over all shards."""
        return sum(e.nbytes for e in self.tensors.values())

    def close(self) -> None:
        for s in self._shards:
            s.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.model_dir)!r}, {len(self.files)} files, {len(self.tensors)} tensors)"
