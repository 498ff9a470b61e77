"""Shared by the stand-in Slurm commands: append one JSON line {cmd, args, env} to $STUB_LOG."""
import json
import os
import sys

ENV_KEYS = ("SLURM_JOB_ID", "RAW", "DATA", "RUN", "NUM_TASKS")


def record(cmd: str, args: list[str]) -> None:
    log = os.environ.get("STUB_LOG")
    if not log:
        sys.exit(f"{cmd} (test stand-in): STUB_LOG is not set")
    line = {"cmd": cmd, "args": args, "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ}}
    with open(log, "a") as f:
        f.write(json.dumps(line) + "\n")


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compact host lists: `gpu[017-018,020],login1` -> gpu017 gpu018 gpu020 login1."""
    hosts, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and text[j] not in ",[":
            j += 1
        prefix = text[i:j]
        if j < len(text) and text[j] == "[":
            end = text.index("]", j)
            for part in text[j + 1:end].split(","):
                low, _, high = part.partition("-")
                for n in range(int(low), int(high or low) + 1):
                    hosts.append(f"{prefix}{n:0{len(low)}d}")
            j = end + 1
        elif prefix:
            hosts.append(prefix)
        i = j + 1  # past the comma
    return hosts


if __name__ == "__main__":  # python3 _record.py CMD ARGS...: record from a shell script
    record(sys.argv[1], sys.argv[2:])
