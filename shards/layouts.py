"""What RAW holds -> classes and, per split, the list of source images with their labels.

Four layouts are detected from what RAW contains (see `detect`):
  ilsvrc2012 / ilsvrc2010  official archives: a train tar of per-class tars, a flat val (and test) tar, the devkit
  kaggle                   ILSVRC/Data/CLS-LOC/{train/<wnid>,val} + LOC_val_solution.csv + LOC_synset_mapping.txt
  folders                  train/<wnid>/* and val/<wnid>/* (test/<wnid>/* too when present)

Archives are never extracted: their headers are read once to find where each JPEG lies, and the builder reads the
bytes from there (`Item.read`). Class index = position of the WNID in the sorted list of training WNIDs.

Listing an archive reads each 512-byte tar header with one unbuffered read: a buffered file reads a whole buffer
per header, the filesystem's block size (1-16 MiB on Lustre/GPFS), which for the 1.28 million headers of the train
archive means reading most of its 140 GB. `detect(..., cache=DATA/.build)` keeps the listing there, so that the
array tasks of one build list each archive once between them (see `cached_listing`).
"""
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

from runtime import write_atomically

SPLITS = ("train", "val", "test")


class LayoutError(ValueError):
    """RAW is not an ImageNet layout this module reads, or lacks a file that its layout needs."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One source image: where its bytes are, its sample key and its class index."""
    key: str  # sample key: the source file's stem, made safe (no dots, no spaces)
    label: int  # class index
    source: str  # what the manifest names: path relative to RAW, archive members joined by '/'
    path: str  # file holding the bytes
    offset: int = 0  # byte offset of the image inside `path` (inside an uncompressed tar)
    size: int = -1  # byte count, -1: the whole file
    problem: str = ""  # known before reading (e.g. no label): the item is listed as rejected with this reason

    def read(self) -> bytes:
        if self.size < 0:
            with open(self.path, "rb") as f:
                return f.read()
        data = os.pread(archive_fd(self.path), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"archive ends {self.size - len(data)} bytes early")
        return data


OPEN_ARCHIVES: dict[str, int] = {}  # path -> file descriptor, per process


def archive_fd(path: str) -> int:
    """One descriptor per archive and process: opening a 140 GB archive per image (or per class when listing) would
    load a parallel file system's metadata server for nothing."""
    fd = OPEN_ARCHIVES.get(path)
    if fd is None:
        fd = OPEN_ARCHIVES[path] = os.open(path, os.O_RDONLY)
    return fd


@dataclasses.dataclass
class Source:
    layout: str
    classes: list[dict]  # [{index, wnid, name}]
    splits: dict[str, list[Item]]  # split -> items in source order (train: sorted by class, then key)


MAX_KEY = 80  # characters: a key plus its longest extension stays within a ustar name (100)


def safe_key(stem: str) -> str:
    """A WebDataset key: no dots (they separate key from extension), nothing a tar listing or DALI index would split."""
    key = re.sub(r"[^\w\-'+,=@~()]", "_", stem, flags=re.ASCII) or "_"
    if len(key) > MAX_KEY:
        key = key[:MAX_KEY - 9] + "_" + hashlib.sha1(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return key


def stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def unique_keys(pairs: list[tuple[str, str]]) -> list[str]:
    """Keys for (group, stem) pairs, unique within the list: a stem seen twice gets its group as a prefix."""
    keys = [safe_key(s) for _, s in pairs]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    keys = [safe_key(f"{g}_{s}") if counts[k] > 1 else k for (g, s), k in zip(pairs, keys)]
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append(k if n == 0 else f"{k}_{n}")
    return out


def read_synset_names(path: Path) -> dict[str, str]:
    """`<wnid> <name>` per line (LOC_synset_mapping.txt, synset_words.txt)."""
    names = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip() or wnid
    return names


def class_list(wnids, names: dict[str, str]) -> list[dict]:
    return [{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(sorted(wnids))]


def files_under(folder: Path) -> list[Path]:
    # Every file is an input, whatever its name: the content decides, and a stray file is listed as rejected
    # rather than silently left out. scandir: the directory listing says which entries are files, without a stat
    # each (1.28 million of them in ImageNet's class folders).
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if e.is_file())


def folders_under(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))


# --- class folders -------------------------------------------------------------------------------------------------

def find_names_file(raw: Path) -> Path | None:
    for name in ("LOC_synset_mapping.txt", "synset_words.txt"):
        if (raw / name).is_file():
            return raw / name
    return None


def folder_splits(raw: Path, root: Path, layout: str, names: dict[str, str],
                  flat_val_labels: dict[str, str] | None = None) -> Source:
    train_dir = root / "train"
    wnids = [p.name for p in folders_under(train_dir)]
    if not wnids:
        raise LayoutError(f"{train_dir} has no class folders")
    index = {w: i for i, w in enumerate(wnids)}
    splits = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        entries = []  # (label, group, file)
        problems = {}
        if split == "val" and flat_val_labels is not None:
            for f in files_under(folder):
                wnid = flat_val_labels.get(stem(f.name))
                if wnid is None:
                    problems[f] = "no label in LOC_val_solution.csv"
                entries.append((index_of(index, wnid, f) if wnid else -1, wnid or "", f))
        else:
            class_dirs = folders_under(folder)
            loose = files_under(folder)
            if loose and not class_dirs:
                raise LayoutError(f"{folder} holds {len(loose)} files but no class folders: expected "
                                 f"{folder}/<wnid>/<image> (reorganise a flat val folder by its labels first)")
            for f in loose:  # stray files beside the class folders: listed, not silently skipped
                problems[f] = "not inside a class folder"
                entries.append((-1, "", f))
            for d in class_dirs:
                for f in files_under(d):
                    entries.append((index_of(index, d.name, d), d.name, f))
        if not entries:
            continue
        keys = unique_keys([(g, stem(f.name)) for _, g, f in entries])
        items = [Item(k, label, str(f.relative_to(raw)), str(f), problem=problems.get(f, ""))
                 for k, (label, _, f) in zip(keys, entries)]
        splits[split] = order(split, items)
    return Source(layout, class_list(wnids, names), splits)


def index_of(index: dict[str, int], wnid: str, where) -> int:
    if wnid not in index:
        raise LayoutError(f"{where}: class {wnid!r} is not one of the {len(index)} training classes")
    return index[wnid]


def order(split: str, items: list[Item]) -> list[Item]:
    """Source order: train by (class, key), which the seeded shuffle then permutes; val/test by key."""
    if split == "train":
        return sorted(items, key=lambda it: (it.label, it.key, it.source))
    return sorted(items, key=lambda it: (it.key, it.source))


# --- official archives ---------------------------------------------------------------------------------------------

def tar_members(path: str, base: int = 0, size: int | None = None) -> list[tuple[str, int, int]]:
    """(name, absolute data offset, size) of the regular files of the uncompressed tar at [base, base + size) of
    `path` (default: all of it), reading only headers."""
    fd = archive_fd(path)
    window = ArchiveWindow(fd, base, os.fstat(fd).st_size - base if size is None else size)
    with tarfile.open(fileobj=window, mode="r:") as tar:
        return [(m.name, base + m.offset_data, m.size) for m in tar if m.isfile()]


def scan_class_tar(args) -> tuple[str, list[tuple[str, int, int]], str | None]:
    """Members of one per-class tar inside the train archive; run in a worker process."""
    path, name, offset, size = args
    try:
        return name, tar_members(path, offset, size), None
    except (tarfile.TarError, OSError, EOFError) as e:
        return name, [], f"{type(e).__name__}: {e}"


class ArchiveWindow(io.RawIOBase):
    """A read-only window [offset, offset+size) of an open file, seekable, for tarfile. Unbuffered: each read is one
    pread of what tarfile asks for, a 512-byte header, not a buffer's worth."""

    def __init__(self, fd: int, offset: int, size: int):
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self.size - self.pos))
        data = os.pread(self.fd, n, self.offset + self.pos)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


LISTING_FORMAT = 1  # of the files cached_listing writes: a change makes every build list its archives again


def cached_listing(archive: Path, cache: Path | None, list_archive):
    """list_archive(archive), kept in `cache` (DATA/.build) and reused while the archive's size and mtime stay the same.

    The array tasks of a build start at about the same time: under an exclusive lock, the first lists the archive and
    the others wait, then load its listing. Where the filesystem has no flock (mounted without it), each task
    lists for itself: slower, equally correct, since the listing is written to a temporary name and renamed.
    """
    if cache is None:
        return list_archive(archive)
    stat = archive.stat()
    key = {"format": LISTING_FORMAT, "archive": archive.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    path = cache / f"listing-{archive.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved["listing"]
        listing = list_archive(archive)
        write_atomically(path, json.dumps({"key": key, "listing": listing}, separators=(",", ":")).encode())
    return listing


@contextlib.contextmanager
def exclusive_lock(path: Path):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # no flock on this filesystem: go on unlocked
            pass
        yield


def read_devkit(devkit: Path) -> dict[str, bytes]:
    """Files of the devkit (a .tar.gz/.tar or an extracted folder) by base name: meta.mat, *ground_truth.txt."""
    wanted = re.compile(r"(meta\.mat|.*ground_truth\.txt)$")
    files = {}
    if devkit.is_dir():
        for p in sorted(devkit.rglob("*")):
            if p.is_file() and wanted.match(p.name):
                files.setdefault(p.name, p.read_bytes())
        return files
    with tarfile.open(devkit) as tar:
        for m in tar:
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and wanted.match(base):
                files.setdefault(base, tar.extractfile(m).read())
    return files


def read_meta(data: bytes) -> tuple[dict[int, str], dict[str, str]]:
    """devkit meta.mat -> ({ILSVRC20xx_ID: WNID} of the leaf classes, {WNID: words})."""
    import scipy.io  # only archive layouts need it: keeps `build` on class folders quick to start

    synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
    id_field = next(f for f in synsets.dtype.names if re.fullmatch(r"ILSVRC\d+_ID", f))
    ids, names = {}, {}
    for s in synsets:
        wnid = str(s["WNID"])
        names[wnid] = str(s["words"])
        if int(s["num_children"]) == 0:
            ids[int(s[id_field])] = wnid
    return ids, names


def image_number(key: str) -> int | None:
    match = re.search(r"(\d+)$", key)
    return int(match.group(1)) if match else None


def list_train_archive(path: Path, workers: int) -> dict[str, list[tuple[str, int, int]]]:
    """Members of each per-class tar inside the train archive, by class tar name."""
    jobs = [(str(path), n, off, size) for n, off, size in tar_members(str(path)) if n.lower().endswith(".tar")]
    if not jobs:
        raise LayoutError(f"{path} holds no per-class .tar files")
    classes = {}
    for name, members, error in map_jobs(scan_class_tar, jobs, workers):
        if error:
            raise LayoutError(f"{path}: cannot read the class archive {name}: {error}")
        classes[name] = members
    return classes


def archive_layout(raw: Path, year: str, found: dict[str, Path], workers: int, cache: Path | None) -> Source:
    devkit = read_devkit(found["devkit"])
    if "meta.mat" not in devkit:
        raise LayoutError(f"{found['devkit']} has no meta.mat")
    id_to_wnid, names = read_meta(devkit["meta.mat"])
    for p in raw.glob(f"ILSVRC{year}_*ground_truth.txt"):  # ground truth given next to the archives
        devkit.setdefault(p.name, p.read_bytes())

    train_classes: dict[str, list[tuple[str, int, int]]] = {}
    if "train" in found:
        listing = cached_listing(found["train"], cache, lambda path: list_train_archive(path, workers))
        train_classes = {stem(name): members for name, members in listing.items()}
        wnids = sorted(train_classes)
    else:
        wnids = sorted(id_to_wnid.values())
    index = {w: i for i, w in enumerate(wnids)}
    splits = {}
    if train_classes:
        splits["train"] = order("train", train_archive_items(found["train"], train_classes, index))
    for split in ("val", "test"):
        if split not in found:
            continue
        gt_name = f"ILSVRC{year}_{'validation' if split == 'val' else 'test'}_ground_truth.txt"
        if gt_name not in devkit:
            if split == "test":  # ILSVRC2012's test labels were never published: no test split then
                print(f"note: {found[split].name} skipped: no {gt_name} in the devkit or in {raw}", file=sys.stderr)
                continue
            raise LayoutError(f"{found[split].name} given but no {gt_name} (in the devkit or in {raw})")
        gt_ids = [int(v) for v in devkit[gt_name].decode().split()]
        splits[split] = order(split, flat_archive_items(found[split], cache, gt_name, gt_ids, id_to_wnid, index))
    return Source(f"ilsvrc{year}", class_list(wnids, names), splits)


def train_archive_items(archive: Path, train_classes: dict[str, list[tuple[str, int, int]]],
                        index: dict[str, int]) -> list[Item]:
    """The images of the per-class tars inside the train archive, labelled by their class tar's WNID."""
    items = []
    for wnid in sorted(train_classes):
        members = train_classes[wnid]
        keys = unique_keys([(wnid, stem(n)) for n, _, _ in members])
        items += [Item(k, index[wnid], f"{archive.name}/{wnid}.tar/{n}", str(archive), off, size)
                  for k, (n, off, size) in zip(keys, members)]
    return items


def flat_archive_items(archive: Path, cache: Path | None, gt_name: str, gt_ids: list[int],
                       id_to_wnid: dict[int, str], index: dict[str, int]) -> list[Item]:
    """The images of a flat val or test archive, labelled by the line of the ground truth (`gt_ids`, one
    ILSVRC20xx_ID per image, image 1 first) that their number names."""
    path = str(archive)
    members = sorted(cached_listing(archive, cache, lambda archive: tar_members(str(archive))),
                     key=lambda m: (stem(m[0]), m[0]))
    keys = unique_keys([("", stem(n)) for n, _, _ in members])
    items = []
    for position, (k, (n, off, size)) in enumerate(zip(keys, members)):
        number = image_number(k) or position + 1
        source = f"{archive.name}/{n}"
        if not 1 <= number <= len(gt_ids):
            items.append(Item(k, -1, source, path, off, size, f"no line {number} in {gt_name}"))
            continue
        wnid = id_to_wnid.get(gt_ids[number - 1])
        if wnid is None or wnid not in index:
            items.append(Item(k, -1, source, path, off, size,
                              f"{gt_name} line {number}: ID {gt_ids[number - 1]} is not a training class"))
            continue
        items.append(Item(k, index[wnid], source, path, off, size))
    return items


def map_jobs(fn, jobs, workers):
    if workers <= 1 or len(jobs) < 8:
        return map(fn, jobs)
    import multiprocessing

    with multiprocessing.Pool(workers) as pool:
        return pool.map(fn, jobs, chunksize=4)


def find_archives(raw: Path) -> tuple[str, dict[str, Path]] | None:
    for year in ("2012", "2010"):
        found = {}
        for p in sorted(raw.iterdir()):
            name = p.name
            if not name.startswith(f"ILSVRC{year}"):
                continue
            lower = name.lower()
            if "devkit" in lower and (p.is_dir() or lower.endswith((".tar.gz", ".tgz", ".tar"))):
                found.setdefault("devkit", p)
            elif lower.endswith(".tar") and p.is_file():
                for split in ("train", "val", "test"):
                    if f"_{split}" in lower or f"{split}." in lower:
                        found.setdefault(split, p)
        if found.keys() - {"devkit"}:
            if "devkit" not in found:
                raise LayoutError(f"{raw}: ILSVRC{year} archives found but no ILSVRC{year}_devkit*.tar.gz "
                                 "(it maps the validation labels to WNIDs)")
            return year, found
    return None


# --- detection -----------------------------------------------------------------------------------------------------

def detect(raw: str | os.PathLike, workers: int = 1, cache: Path | None = None) -> Source:
    """The layout of RAW and its inputs; `cache` (DATA/.build): where archive listings are kept for the next task."""
    raw = Path(raw)
    if not raw.is_dir():
        raise LayoutError(f"--raw={raw}: not a directory")
    archives = find_archives(raw)
    if archives:
        return archive_layout(raw, archives[0], archives[1], workers, cache)
    kaggle = raw / "ILSVRC" / "Data" / "CLS-LOC"
    if (kaggle / "train").is_dir():
        mapping, solution = raw / "LOC_synset_mapping.txt", raw / "LOC_val_solution.csv"
        if not mapping.is_file():
            raise LayoutError(f"{raw}: Kaggle layout found but no LOC_synset_mapping.txt")
        val_labels = None
        if (kaggle / "val").is_dir():
            if not solution.is_file():
                raise LayoutError(f"{raw}: Kaggle layout with a val folder but no LOC_val_solution.csv")
            val_labels = read_kaggle_solution(solution)
        return folder_splits(raw, kaggle, "kaggle", read_synset_names(mapping), val_labels)
    if (raw / "train").is_dir():
        names_file = find_names_file(raw)
        return folder_splits(raw, raw, "folders", read_synset_names(names_file) if names_file else {})
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in raw.iterdir())
    shown = ", ".join(listing[:12]) + (f" ... ({len(listing)} entries)" if len(listing) > 12 else "")
    raise LayoutError(f"{raw}: no ImageNet layout recognised (expected ILSVRC2012_img_*.tar + devkit, "
                     f"ILSVRC2010 archives, train/<wnid>/ folders or Kaggle ILSVRC/Data/CLS-LOC); "
                     f"found: {shown or 'nothing'}")


def read_kaggle_solution(path: Path) -> dict[str, str]:
    """LOC_val_solution.csv: ImageId -> WNID, the first word of PredictionString."""
    with open(path, newline="") as f:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
