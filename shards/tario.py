"""Writing a shard: an uncompressed ustar archive of samples and its DALI index (the format of DALI's `wds2idx`).

The tar is written member by member with fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same samples always
give the same bytes, and the offsets for the index are known as it is written: no second pass, no `tar` process.
"""
import hashlib
import tarfile

BLOCK = tarfile.BLOCKSIZE  # 512 bytes
RECORD = tarfile.RECORDSIZE  # tar files are padded to a multiple of this, as GNU tar and Python's tarfile do
INDEX_VERSION = "v1.2"  # first token of a wds2idx index file


def member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def write_tar(f, samples) -> tuple[str, str]:
    """Write `samples` ([(key, [(ext, bytes), ...]), ...]) to the binary file `f`; return (sha256, index text)."""
    digest = hashlib.sha256()
    pos = 0
    lines = []

    def put(data: bytes):
        nonlocal pos
        f.write(data)
        digest.update(data)
        pos += len(data)

    for key, members in samples:
        fields = []
        for ext, data in members:
            name = f"{key}.{ext}"
            put(member_header(name, len(data)))
            fields.append(f"{ext} {pos} {len(data)} {name}")
            put(data)
            if len(data) % BLOCK:
                put(b"\0" * (BLOCK - len(data) % BLOCK))
        lines.append(" ".join(fields))
    put(b"\0" * (2 * BLOCK))
    if pos % RECORD:
        put(b"\0" * (RECORD - pos % RECORD))
    index = f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)
    return digest.hexdigest(), index


def index_of_tar(path: str) -> str:
    """The wds2idx index of an existing tar, read with tarfile (used by verify and the tests)."""
    bundles: list[list[str]] = []
    last = None
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            dot = m.name.find(".", m.name.rfind("/") + 1)
            if dot <= 0 or not base or base.startswith("."):
                continue
            key, ext = m.name[:dot], m.name[dot + 1:]
            field = f"{ext} {m.offset_data} {m.size} {m.name}"
            if key != last:
                bundles.append([field])
                last = key
            else:
                bundles[-1].append(field)
    return f"{INDEX_VERSION} {len(bundles)}\n" + "".join(" ".join(b) + "\n" for b in bundles)
