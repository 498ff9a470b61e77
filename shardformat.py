"""The shard format of docs/FORMAT.md in one place: what `shards/` writes and `pipeline/`, `eval.py` read.

It imports nothing from the project, so that the writer and the readers share it without depending on each other.

    import shardformat
    manifest = shardformat.read_manifest("data/sample")   # checked: present, JSON, this format version
"""
import json
import os
from pathlib import Path

FORMAT_VERSION = 2  # 2: the sample position member is `.pos` (was `.index`)
SIZE = 256  # px, side of every stored image
MANIFEST = "manifest.json"  # in DATA: classes, shards with their sha256, rejected inputs, statistics
STATS = "stats.npz"  # in DATA: mean image, RGB mean and PCA of the training set
INDEX_VERSION = "v1.2"  # first token of the index files the build writes (DALI's wds2idx format, with member names)


def shard_file(split: str, number: int) -> str:
    """The `file` of a split's shard `number` in the manifest, relative to DATA."""
    return f"{split}/{split}-{number:06d}.tar"


def index_path(tar: str | os.PathLike) -> Path:
    """The DALI index beside a shard's tar."""
    return Path(tar).with_suffix(".idx")


def read_manifest(data: str | os.PathLike) -> dict:
    """`DATA/manifest.json` as a dict; FileNotFoundError when there is none, ValueError when it is unreadable or of
    another format version, each naming the file."""
    path = Path(data) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{data}: no {MANIFEST} (is it a directory written by `shards build`?)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable manifest: {e}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT_VERSION:
        raise ValueError(f"{path}: shard format {found}, this version reads format {FORMAT_VERSION}: rebuild the "
                         "shards into an empty directory")
    return manifest


def parse_index_header(line: bytes) -> tuple[str, int]:
    """(version, number of samples) from an index's first line; ValueError when it is not a DALI index's."""
    fields = line.split()
    if len(fields) != 2 or not fields[0].startswith(b"v1") or not fields[1].isdigit():
        raise ValueError(f"is not a DALI webdataset index (header {fields!r})")
    return fields[0].decode(), int(fields[1])


def fields_per_member(version: str) -> int:
    """Fields of one member in an index line: `<ext> <offset> <size>`, and v1.2 adds the member's name."""
    return 4 if version == "v1.2" else 3


def parse_index_line(line: bytes, version: str) -> list[tuple[str, int, int]]:
    """One sample's members, as (ext, offset in the tar, size), from its line of an index of `version`.

    Each member is `<ext> <offset> <size>`; v1.2 adds the member's name. ValueError when the line is not that.
    """
    fields = line.split()
    step = fields_per_member(version)
    if len(fields) % step:
        raise ValueError(f"{len(fields)} fields, not {step} per member")
    return [(fields[i].decode(), int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), step)]
