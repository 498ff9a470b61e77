"""Build WebDataset shards from ImageNet: every image resized (shorter side 256), centre-cropped to 256x256, re-encoded.

    python -m shards build --raw=/scratch/imagenet --out=/scratch/imagenet-shards            # one node, all cores
    python -m shards build --raw=... --out=DATA --task_index=$SLURM_ARRAY_TASK_ID --num_tasks=16   # one array task
    python -m shards merge --out=DATA                                                        # after all tasks

See docs/FORMAT.md for what is written. How it works:
  1. plan    detect the layout, list every input with its label (archives: headers only), shuffle train with the
             seed, cut each split into shards of `shard_size` inputs. The plan depends only on input and parameters,
             so every array task computes the same one and shard j belongs to task j % num_tasks.
  2. shards  workers turn chunks of inputs into JPEGs plus exact integer sums for the statistics; the main process
             writes each shard to `<name>.tar.tmp-<host>-<pid>` and renames it when complete. Per-shard results
             (count, sha256, rejected, converted, statistics sums) go to DATA/.build/. A rerun skips shards that are
             complete.
  3. merge   once every shard exists: manifest.json and stats.npz from the per-shard results.
"""
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from config import parse_config
from progress import DEFAULT_INTERVAL_S, progress_bar
from runtime import UsageError, atomic_path, available_cpus, limit_threads, run_main, usage_errors, write_atomically
from shardformat import FORMAT_VERSION, MANIFEST, STATS, index_path, shard_file
from shards import image, layouts, tario

CHUNK = 32  # inputs per worker job: large enough to amortise the IPC, small enough to balance the load
BUILD_DIR = ".build"  # under DATA: the plan and the per-shard results that `merge` combines
SUMS = ("sum_image", "pixel_outer", "num_images")  # the exact statistics sums kept per shard in BUILD_DIR


@dataclasses.dataclass
class BuildConfig:
    raw: str = ""  # ImageNet as downloaded: official archives, Kaggle layout, or train/<wnid>/ + val/<wnid>/ folders
    out: str = ""  # output directory DATA (shards, manifest.json, stats.npz)
    shard_size: int = 4096  # inputs per shard (~100 MB; full ImageNet: 313 train shards)
    quality: int = 90  # JPEG quality of the re-encoded 256x256 images
    seed: int = 0  # seed of the global shuffle of the training set
    workers: int = 0  # processes; 0 = every core this process may use
    task_index: int = 0  # this task's number in a job array, 0..num_tasks-1 (SLURM_ARRAY_TASK_ID)
    num_tasks: int = 1  # tasks in the job array; with 1 the build also merges
    progress_interval: float = DEFAULT_INTERVAL_S  # seconds between progress lines when the output is not a terminal


@dataclasses.dataclass
class MergeConfig:
    out: str = ""  # the DATA directory the array tasks wrote


@dataclasses.dataclass
class Shard:
    split: str
    number: int
    items: list  # [(position in split, layouts.Item)]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}"

    @property
    def file(self) -> str:
        return shard_file(self.split, self.number)


# --- plan ----------------------------------------------------------------------------------------------------------

def make_plan(source: layouts.Source, cfg: BuildConfig) -> tuple[dict, list[Shard]]:
    if "train" not in source.splits:
        raise layouts.LayoutError(f"{cfg.raw}: no training images found (layout {source.layout}); the class list "
                                  "and the statistics come from the training set")
    shards, splits, fingerprint = [], {}, hashlib.sha256()
    for split in layouts.SPLITS:
        items = source.splits.get(split)
        if not items:
            continue
        if split == "train":
            # The readers only shuffle inside a small buffer, so the files themselves must be in random order.
            items = [items[i] for i in np.random.default_rng(cfg.seed).permutation(len(items))]
        count = -(-len(items) // cfg.shard_size)
        for n in range(count):
            chunk = items[n * cfg.shard_size:(n + 1) * cfg.shard_size]
            shards.append(Shard(split, n, list(enumerate(chunk, start=n * cfg.shard_size))))
        splits[split] = {"num_inputs": len(items), "num_shards": count}
        for it in items:
            fingerprint.update(f"{split}\t{it.source}\t{it.key}\t{it.label}\t{it.size}\n".encode("utf-8", "replace"))
    plan = {
        "format": FORMAT_VERSION,
        "params": {"size": image.SIZE, "quality": cfg.quality, "shard_size": cfg.shard_size, "seed": cfg.seed,
                   "layout": source.layout, "raw": str(Path(cfg.raw).resolve()), "pillow": pillow_version()},
        "inputs_sha256": fingerprint.hexdigest(),
        "classes": source.classes,
        "splits": splits,
    }
    return plan, shards


def pillow_version() -> str:
    import PIL

    return PIL.__version__  # the JPEG bytes depend on the encoder: recorded so a rebuild can be compared


def save_plan(out: Path, plan: dict) -> None:
    """Write DATA/.build/plan.json, or check that the one there (from an earlier run or task) is the same plan."""
    path = out / BUILD_DIR / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        same = lambda p: {**p, "params": {k: v for k, v in p["params"].items() if k != "raw"}}  # noqa: E731
        if same(old) != same(plan):
            diff = [k for k in plan["params"] if old["params"].get(k) != plan["params"][k] and k != "raw"]
            what = f"parameters differ: {', '.join(diff)}" if diff else "the input differs"
            if old.get("format") != plan["format"]:
                what = f"shard format {old.get('format')}, this version writes format {plan['format']}"
            raise ValueError(f"{out} holds a build with another plan ({what}); use an empty --out or the same "
                             "input and parameters to resume")
        return
    write_atomically(path, json.dumps(plan, indent=1).encode())


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())


# --- converting inputs (runs in the worker processes) ----------------------------------------------------------------

def convert_chunk(job):
    """[(position, Item)] -> samples, rejected, converted and the statistics sums of the written images."""
    shard_name, items, quality, with_stats = job
    samples, rejected, converted = [], [], []
    size = image.SIZE
    # uint16 holds a sum of up to 257 images of uint8: half the bytes to send back of uint32.
    sums = {"sum_image": np.zeros((size, size, 3), np.uint16 if len(items) <= 257 else np.uint64),
            "pixel_outer": np.zeros((3, 3), np.int64), "num_images": 0} if with_stats else None
    for position, item in items:
        try:
            if item.problem:
                raise image.Rejected(item.problem)
            try:
                data = item.read()
            except OSError as e:
                raise image.Rejected(f"cannot read: {e}") from None
            jpeg, what = image.prepare(data, quality)
        except image.Rejected as e:
            rejected.append({"position": position, "source": item.source, "reason": str(e)})
            continue
        except Exception as e:  # noqa: BLE001 - one bad file must never stop a build of 1.28 million
            rejected.append({"position": position, "source": item.source,
                             "reason": f"unexpected error: {type(e).__name__}: {e}"})
            continue
        if what:
            converted.append({"position": position, "source": item.source, "what": ", ".join(what)})
        samples.append((position, tario.sample_record(*sample_members(item.key, item.label, position, jpeg))))
        if sums is not None:  # of the pixels the pipelines decode: the JPEG's, not those before encoding
            add_pixel_sums(sums, image.decoded_pixels(jpeg))
    return shard_name, samples, rejected, converted, sums


def add_pixel_sums(sums: dict, pixels: np.ndarray) -> None:
    """Accumulate one 256x256 RGB image into the exact statistics sums (mean image, RGB sums of products); the RGB
    sums themselves are those of the summed image (see `merge`)."""
    sums["sum_image"] += pixels
    # One contiguous float64 row per channel (the bytes transposed first, then widened): six 1-D dot products are
    # 3x faster than a (65536x3)^T matmul. float64 is exact here: every product is an integer <= 255^2 and a sum
    # over one image stays below 2^53.
    planes = np.ascontiguousarray(pixels.reshape(-1, 3).T).astype(np.float64)
    for i in range(3):
        for j in range(i, 3):
            product = int(planes[i].dot(planes[j]))
            sums["pixel_outer"][i, j] += product
            if i != j:
                sums["pixel_outer"][j, i] += product
    sums["num_images"] += 1


def sample_members(key: str, label: int, position: int, jpeg: bytes):
    return key, [("jpg", jpeg), ("cls", str(label).encode()), ("label", np.int32(label).tobytes()),
                 ("pos", np.int32(position).tobytes())]


# --- writing shards (main process) ---------------------------------------------------------------------------------

def partial_paths(out: Path, shard: Shard) -> tuple[Path, Path]:
    return out / BUILD_DIR / f"{shard.name}.json", out / BUILD_DIR / f"{shard.name}.npz"


def is_complete(out: Path, shard: Shard) -> bool:
    """The tar is renamed last, so its presence with the others means the shard was finished."""
    tar = out / shard.file
    return tar.exists() and index_path(tar).exists() and partial_paths(out, shard)[0].exists()


def write_shard(out: Path, shard: Shard, results: list, with_stats: bool) -> dict:
    samples = sorted((s for r in results for s in r[1]), key=lambda s: s[0])
    rejected = sorted((x for r in results for x in r[2]), key=lambda x: x["position"])
    converted = sorted((x for r in results for x in r[3]), key=lambda x: x["position"])
    tar = out / shard.file
    tar.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(tar) as tmp:  # renamed last: a shard whose tar is there is complete (see is_complete)
        with open(tmp, "wb") as f:
            sha, index = tario.write_tar(f, [record for _, record in samples])
            f.flush()
            os.fsync(f.fileno())
        result = {"shard": shard.name, "file": shard.file, "num_inputs": len(shard.items),
                  "num_samples": len(samples), "sha256": sha, "rejected": rejected, "converted": converted}
        json_path, npz_path = partial_paths(out, shard)
        if with_stats:
            total = {"sum_image": sum(r[4]["sum_image"].astype(np.uint64) for r in results),
                     **{k: sum(r[4][k] for r in results) for k in SUMS[1:]}}
            atomic_savez(npz_path, **total)
        write_atomically(json_path, json.dumps(result, indent=1).encode())
        write_atomically(index_path(tar), index.encode())
    return result


def run_shards(out: Path, shards: list[Shard], cfg: BuildConfig, workers: int) -> list[dict]:
    jobs, counts = [], {}
    for shard in shards:
        with_stats = shard.split == "train"
        for i in range(0, len(shard.items), CHUNK):
            jobs.append((shard.name, shard.items[i:i + CHUNK], cfg.quality, with_stats))
        counts[shard.name] = -(-len(shard.items) // CHUNK)
    by_name = {s.name: s for s in shards}
    total = sum(len(s.items) for s in shards)
    # One BLAS thread per worker: the statistics' dot products would otherwise start a pool per worker (9x slower).
    pool = multiprocessing.Pool(workers, limit_threads, (1,)) if workers > 1 and len(jobs) > 1 else None
    results, done = {}, []
    try:
        stream = pool.imap(convert_chunk, jobs) if pool else map(convert_chunk, jobs)
        with progress_bar(total, "shards", unit="img", enabled=total > 0, interval_s=cfg.progress_interval) as bar:
            for r in stream:
                results.setdefault(r[0], []).append(r)
                bar.update(len(r[1]) + len(r[2]))
                if len(results[r[0]]) == counts[r[0]]:
                    shard = by_name[r[0]]
                    done.append(write_shard(out, shard, results.pop(r[0]), shard.split == "train"))
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return done


def task_summary(results: list[dict], seconds: float, workers: int) -> str:
    images = sum(r["num_inputs"] for r in results)
    rate = images / seconds if seconds > 0 else 0.0
    return (f"wrote {len(results)} shards from {images} inputs in {seconds:.1f} s: {rate:.0f} images/s on "
            f"{workers} workers ({rate / max(workers, 1):.1f} per worker)")


def check_config(cfg: BuildConfig) -> None:
    """A ValueError naming the option when `cfg` describes no build."""
    if not cfg.raw or not cfg.out:
        raise ValueError("both --raw=DIR (ImageNet) and --out=DIR (where the shards go) are required")
    raw, out = Path(cfg.raw).resolve(), Path(cfg.out).resolve()
    if out == raw or raw in out.parents:  # the shards would become inputs of the next build from RAW
        raise ValueError(f"--out={cfg.out} lies inside --raw={cfg.raw}: write the shards elsewhere")
    if cfg.shard_size < 1:
        raise ValueError(f"--shard_size={cfg.shard_size}: must be at least 1")
    if not 1 <= cfg.quality <= 100:
        raise ValueError(f"--quality={cfg.quality}: must be 1..100")
    if cfg.num_tasks < 1 or not 0 <= cfg.task_index < cfg.num_tasks:
        raise ValueError(f"--task_index={cfg.task_index} --num_tasks={cfg.num_tasks}: "
                         "need 0 <= task_index < num_tasks")


@dataclasses.dataclass
class Task:
    """One build task's share of the plan, ready to write."""
    out: Path
    layout: str  # the layout RAW was found in
    plan: dict
    shards: list[Shard]  # this task's shards
    workers: int
    start: float  # perf_counter() when the task started


def plan_task(cfg: BuildConfig) -> Task:
    """Check the options, read RAW's layout, plan every shard (saved as plan.json) and pick this task's.

    A LayoutError or ValueError names what is wrong with RAW, DATA or `cfg`.
    """
    check_config(cfg)
    start, workers, out = time.perf_counter(), cfg.workers if cfg.workers > 0 else available_cpus(), Path(cfg.out)
    source = layouts.detect(cfg.raw, workers, cache=out / BUILD_DIR)
    plan, shards = make_plan(source, cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_plan(out, plan)
    mine = [s for j, s in enumerate(shards) if j % cfg.num_tasks == cfg.task_index]
    return Task(out, source.layout, plan, mine, workers, start)


def run_task(cfg: BuildConfig, task: Task) -> dict | None:
    """Write the task's shards that are not complete yet; with num_tasks=1 also merge. The manifest when merged."""
    for s in task.shards:  # what a killed run of this task left: the tar under atomic_path's temporary name
        for tmp in (task.out / s.split).glob(f"{s.name}.tar.tmp-*"):
            tmp.unlink()
    todo = [s for s in task.shards if not is_complete(task.out, s)]
    skipped = len(task.shards) - len(todo)
    name = f"task {cfg.task_index}/{cfg.num_tasks}: " if cfg.num_tasks > 1 else ""
    planned = ", ".join(f"{k} {v['num_inputs']} inputs in {v['num_shards']} shards"
                        for k, v in task.plan["splits"].items())
    print(f"{name}{task.layout} layout: {planned}; {len(todo)} shards to write"
          + (f", {skipped} already complete" if skipped else ""), file=sys.stderr)
    t0 = time.perf_counter()
    results = run_shards(task.out, todo, cfg, task.workers)
    print(f"{name}{task_summary(results, time.perf_counter() - t0, task.workers)}", file=sys.stderr)
    if cfg.num_tasks > 1:
        print(f"{name}done in {time.perf_counter() - task.start:.1f} s; run `python -m shards merge "
              f"--out={task.out}` once every task has finished", file=sys.stderr)
        return None
    return merge(task.out)


def build(cfg: BuildConfig) -> dict | None:
    """Run one task of the build; with num_tasks=1 also merge. Returns the manifest when merged."""
    return run_task(cfg, plan_task(cfg))


# --- merge ---------------------------------------------------------------------------------------------------------

def plan_shards(plan: dict) -> list[Shard]:
    return [Shard(split, n, []) for split, v in plan["splits"].items() for n in range(v["num_shards"])]


def pca(pixel_sum: np.ndarray, pixel_outer: np.ndarray, num_pixels: int):
    """Mean (0-255) and eigen-decomposition of the covariance on the [0,1] scale, from exact integer sums."""
    s = [int(v) for v in pixel_sum]
    # Covariance numerators in exact integer arithmetic: P * sum(x_i x_j) - sum(x_i) sum(x_j).
    num = np.array([[int(pixel_outer[i, j]) * num_pixels - s[i] * s[j] for j in range(3)] for i in range(3)],
                   dtype=np.float64)
    cov = num / (float(num_pixels) ** 2 * 255.0 ** 2)
    eigval, eigvec = np.linalg.eigh(cov)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    # A component's sign is arbitrary; fix it (largest entry positive) so the manifest is reproducible.
    signs = np.sign(eigvec[np.abs(eigvec).argmax(0), range(3)])
    eigvec = eigvec * np.where(signs == 0, 1, signs)
    return np.array(s, np.float64) / num_pixels, eigval, eigvec


def merge(out: Path | str) -> dict:
    out = Path(out)
    plan_path = out / BUILD_DIR / "plan.json"
    if not plan_path.exists():
        raise FileNotFoundError(f"{out}: no {BUILD_DIR}/plan.json, so no build was started there")
    plan = json.loads(plan_path.read_text())
    shards = plan_shards(plan)
    missing = [s.name for s in shards if not is_complete(out, s)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{out}: {len(missing)} of {len(shards)} shards are not complete ({shown}); "
                         "rerun the build tasks that own them (they skip finished shards)")
    splits, rejected, converted = {}, [], []
    totals = None
    for s in shards:
        json_path, npz_path = partial_paths(out, s)
        r = json.loads(json_path.read_text())
        entry = splits.setdefault(s.split, {"num_samples": 0, "num_inputs": 0, "shards": []})
        entry["num_samples"] += r["num_samples"]
        entry["num_inputs"] += r["num_inputs"]
        entry["shards"].append({"file": r["file"], "num_samples": r["num_samples"], "sha256": r["sha256"]})
        rejected += [{"split": s.split, "source": x["source"], "reason": x["reason"]} for x in r["rejected"]]
        converted += [{"split": s.split, "source": x["source"], "what": x["what"]} for x in r["converted"]]
        if s.split == "train":
            with np.load(npz_path) as z:
                part = {k: z[k] for k in z.files}
            totals = {k: part[k] if totals is None else totals[k] + part[k] for k in SUMS}
    for name, entry in splits.items():
        entry["num_rejected"] = entry["num_inputs"] - entry["num_samples"]
        if entry["num_inputs"] != plan["splits"][name]["num_inputs"]:
            raise ValueError(f"{out}: {name} shards account for {entry['num_inputs']} inputs, the plan has "
                             f"{plan['splits'][name]['num_inputs']}")
    num_images = int(totals["num_images"])
    if num_images == 0:
        train_rejected = [x for x in rejected if x["split"] == "train"]
        if not train_rejected:
            raise UsageError(f"{out}: no training images; no statistics can be computed")
        first, others = train_rejected[0], ", and the others" if len(train_rejected) > 1 else ""
        raise UsageError(f"{out}: every training image was rejected ({first['source']}: {first['reason']}{others}); "
                         "no statistics can be computed: check --raw")
    num_pixels = num_images * image.SIZE * image.SIZE
    pixel_sum = totals["sum_image"].sum(axis=(0, 1), dtype=np.uint64)  # exact: integers summed as integers
    rgb_mean, eigval, eigvec = pca(pixel_sum, totals["pixel_outer"], num_pixels)
    mean_image = totals["sum_image"].astype(np.float64) / num_images
    stats = {"rgb_mean": rgb_mean.tolist(), "pca_eigval": eigval.tolist(), "pca_eigvec": eigvec.tolist(),
             "num_images": num_images, "num_pixels": num_pixels}
    atomic_savez(out / STATS, mean_image=mean_image, rgb_mean=rgb_mean, pca_eigval=eigval, pca_eigvec=eigvec)
    manifest = {"format": FORMAT_VERSION, "classes": plan["classes"], "splits": splits, "rejected": rejected,
                "converted": converted, "stats": stats, "params": plan["params"]}
    write_atomically(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    print(summary_table(manifest), file=sys.stderr)
    return manifest


def summary_table(manifest: dict) -> str:
    rows = [("split", "inputs", "written", "rejected", "converted", "shards")]
    for name, e in manifest["splits"].items():
        conv = sum(1 for c in manifest["converted"] if c["split"] == name)
        rows.append((name, e["num_inputs"], e["num_samples"], e["num_rejected"], conv, len(e["shards"])))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for name, e in manifest["splits"].items():
        lines.append(f"{name}: {e['num_inputs']} inputs = {e['num_samples']} written + {e['num_rejected']} rejected")
    for r in manifest["rejected"][:10]:
        lines.append(f"rejected {r['source']}: {r['reason']}")
    if len(manifest["rejected"]) > 10:
        lines.append(f"... {len(manifest['rejected']) - 10} more rejected inputs listed in manifest.json")
    st = manifest["stats"]
    lines.append("train rgb_mean " + " ".join(f"{v:.2f}" for v in st["rgb_mean"]) + ", pca_eigval "
                 + " ".join(f"{v:.4f}" for v in st["pca_eigval"]))
    return "\n".join(lines)


def build_main(argv: list[str]) -> None:
    limit_threads(1)  # this process writes tars beside the workers; with one worker it converts too
    cfg = parse_config(BuildConfig, argv, description=__doc__)
    with usage_errors():  # what is wrong with RAW, DATA or the options; an error while writing keeps its traceback
        task = plan_task(cfg)
    run_task(cfg, task)


def merge_main(argv: list[str]) -> None:
    cfg = parse_config(MergeConfig, argv, description="Write manifest.json and stats.npz after all build tasks.")
    if not cfg.out:
        raise UsageError("--out=DIR is required (the directory the build tasks wrote)")
    with usage_errors():
        merge(cfg.out)


if __name__ == "__main__":
    run_main(build_main)
