"""ImageNet -> WebDataset shards.

    python -m shards sample --out=data/sample-raw          # the built-in sample ImageNet (official archive layout)
    python -m shards build  --raw=<imagenet> --out=<DATA>   # shuffled 256x256 shards + manifest + statistics
    python -m shards merge  --out=<DATA>                    # after `build --task_index=i --num_tasks=n` array tasks
    python -m shards verify --data=<DATA>                   # re-read every shard against the manifest
    python -m shards stage  --data=<DATA> --to=<local dir>  # copy shards to node-local disk, verified
    python -m shards replicate --data=<DATA> --out=<dir> --copies=20   # benchmark data: every split copied

Each command takes --help.
"""
import importlib
import sys

from runtime import UsageError, run_main

COMMANDS = {"sample": "shards.sample", "build": "shards.build", "merge": "shards.build", "verify": "shards.verify",
            "stage": "shards.stage", "replicate": "shards.replicate"}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[command])
    getattr(module, f"{command}_main")(rest)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
