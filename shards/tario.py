"""Writing a shard: an uncompressed ustar archive of samples and its DALI index (the format of DALI's `wds2idx`).

The tar is written sample by sample with fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same samples always
give the same bytes, and the offsets for the index are known as it is written: no second pass, no `tar` process.
The build's workers turn each sample into its tar bytes (`sample_record`); the process writing the shard only
appends them.
"""
import hashlib
import tarfile

from shardformat import INDEX_VERSION

BLOCK = tarfile.BLOCKSIZE  # 512 bytes
RECORD = tarfile.RECORDSIZE  # tar files are padded to a multiple of this, as GNU tar and Python's tarfile do


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` of `size` bytes with the fixed metadata above: the bytes
    Python's tarfile writes for it (tests/test_shards_build.py compares them), built directly because the build
    writes four members per image."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    # name, mode, uid, gid, size, mtime, checksum (spaces while summing), type, link name, magic + version,
    # user and group names, device numbers (empty for a regular file), prefix
    fields = [encoded.ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0", b"%011o\0" % size,
              b"00000000000\0", b" " * 8, b"0", b"\0" * 100, b"ustar\x0000", b"\0" * 80, b"\0" * 155]
    header = b"".join(fields).ljust(BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(header)  # over the header with its checksum field as eight spaces
    return header[:148] + checksum + header[156:]


def sample_record(key: str, members) -> tuple[bytes, list[tuple[str, int, int, str]]]:
    """One sample's members ([(ext, bytes), ...]) as the tar bytes that hold them (header, data, padding each), and
    each member's (ext, data offset within those bytes, size, name) for the index."""
    parts, fields, at = [], [], 0
    for ext, data in members:
        name = f"{key}.{ext}"
        padding = -len(data) % BLOCK
        parts += [member_header(name, len(data)), data, b"\0" * padding]
        fields.append((ext, at + BLOCK, len(data), name))
        at += BLOCK + len(data) + padding
    return b"".join(parts), fields


def write_tar(f, records) -> tuple[str, str]:
    """Write sample records (see `sample_record`) to the binary file `f` as one tar; return (sha256, index text)."""
    digest = hashlib.sha256()
    pos = 0
    lines = []
    for data, fields in records:
        f.write(data)
        digest.update(data)
        lines.append(" ".join(f"{ext} {pos + offset} {size} {name}" for ext, offset, size, name in fields))
        pos += len(data)
    end = b"\0" * (2 * BLOCK + -(pos + 2 * BLOCK) % RECORD)  # two zero blocks, then zeros to a whole record
    f.write(end)
    digest.update(end)
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
