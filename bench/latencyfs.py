"""A read-only passthrough FUSE mount that adds a fixed delay to every read: network scratch storage, simulated.

    python -m bench.latencyfs --source=data/bench --mount=/tmp/slow --latency_ms=5   # until unmounted
    fusermount -u /tmp/slow

Every `read` the kernel passes on (direct I/O: no page cache, no read-ahead, so each read of a reader reaches the
mount) waits `latency_ms`, then reads the file underneath. Reads are served by many threads at once, as a parallel
filesystem serves many requests: reads/s = reads in flight / latency. Needs FUSE (`apt-get install fuse3 libfuse2`)
and the `latency` extra (fusepy); `mounted(...)` says why it cannot mount instead of failing.
"""
import contextlib
import dataclasses
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from config import parse_config

MOUNT_TIMEOUT = 20  # seconds to wait for the mount to appear


def why_unavailable() -> str | None:
    """None where a latency mount can be made here, else the reason."""
    try:
        import fuse  # noqa: F401 - fusepy, the `latency` extra
    except (ImportError, OSError) as e:  # OSError: fusepy found no libfuse
        return f"no FUSE for Python ({e}; pip install fusepy, apt-get install fuse3 libfuse2)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if shutil.which("fusermount") is None and shutil.which("fusermount3") is None:
        return "no fusermount (apt-get install fuse3)"
    return None


def passthrough(source: Path, latency: float):
    """fusepy Operations: the files under `source`, read-only, every read delayed by `latency` seconds."""
    from fuse import FuseOSError, Operations

    class LatencyPassthrough(Operations):
        def _path(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(self._path(path))
            except OSError as e:
                raise FuseOSError(e.errno) from None
            return {key: getattr(st, key) for key in ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid",
                                                      "st_atime", "st_mtime", "st_ctime")}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._path(path))]

        def open(self, path, flags):
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise FuseOSError(errno.EROFS)
            return os.open(self._path(path), os.O_RDONLY)

        def read(self, path, size, offset, fh):
            time.sleep(latency)
            return os.pread(fh, size, offset)

        def release(self, path, fh):
            os.close(fh)
            return 0

        def statfs(self, path):
            st = os.statvfs(self._path(path))
            return {key: getattr(st, key) for key in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                      "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    return LatencyPassthrough()


def serve(source: Path, mount: Path, latency_ms: float) -> None:
    """Mount and serve until unmounted (foreground, multithreaded)."""
    from fuse import FUSE
    FUSE(passthrough(source.resolve(), latency_ms / 1000), str(mount), foreground=True, nothreads=False, ro=True,
         direct_io=True)


@contextlib.contextmanager
def mounted(source: Path, mount: Path, latency_ms: float):
    """`mount` serving `source` with `latency_ms` per read for the block's duration, from a process of its own."""
    mount.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "bench.latencyfs", f"--source={source}", f"--mount={mount}",
                               f"--latency_ms={latency_ms}"], stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mount):
            if server.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"latency mount at {mount} did not start: {server.communicate()[1].strip()[-500:]}")
            time.sleep(0.05)
        yield mount
    finally:
        unmount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
        subprocess.run([unmount, "-u", "-z", str(mount)], capture_output=True)  # lazily: a reader may hold files
        try:
            server.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()


@dataclasses.dataclass
class LatencyConfig:
    source: str = ""  # the directory to serve
    mount: str = ""  # an empty directory to mount it on
    latency_ms: float = 5.0  # added to every read


def main(argv: list[str]) -> None:
    cfg = parse_config(LatencyConfig, argv, description=__doc__)
    serve(Path(cfg.source), Path(cfg.mount), cfg.latency_ms)


if __name__ == "__main__":
    main(sys.argv[1:])
