"""ImageNet -> WebDataset shards.

    python -m shards sample --out=data/sample-raw          # the built-in sample ImageNet (official archive layout)
    python -m shards build  --raw=<imagenet> --out=<DATA>   # shuffled 256x256 shards + manifest + statistics
    python -m shards merge  --out=<DATA>                    # after `build --task_index=i --num_tasks=n` array tasks
    python -m shards verify --data=<DATA>                   # re-read every shard against the manifest
    python -m shards stage  --data=<DATA> --to=<local dir>  # copy shards to node-local disk, verified
    python -m shards replicate --data=<DATA> --out=<dir> --copies=20   # benchmark data: every split copied
    python -m shards synthetic --out=<dir>                  # benchmark data of ImageNet's size (1.28 M, 1,024 shards)

Each command takes --help.
"""
import sys

from runtime import UsageError, run_main
from shards.build import build_main, merge_main
from shards.replicate import replicate_main
from shards.sample import sample_main
from shards.stage import stage_main
from shards.synthetic import synthetic_main
from shards.verify import verify_main

COMMANDS = {"sample": sample_main, "build": build_main, "merge": merge_main, "verify": verify_main,
            "stage": stage_main, "replicate": replicate_main, "synthetic": synthetic_main}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
    COMMANDS[command](rest)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
