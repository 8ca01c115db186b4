"""Fill in torchrun's flags from `launch.*`: `forge torchrun <overrides> launch.gpus_per_node=8`.

It adds nothing the trainer lacks: it validates the config (the same checks `forge_lm.trainer.train` makes, with the
world size the flags will give, so a layout that does not match fails here, before any process starts),
prints the torchrun command and runs it. Everything it does by hand:

    torchrun --standalone --nproc-per-node 8 -m forge_lm.trainer.train <overrides>                       # one node
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node001:29500 \\
        --rdzv-id myrun -m forge_lm.trainer.train <overrides>                                         # on each node

`launch.nodes=2 launch.rdzv_endpoint=node001:29500` gives the second form (run the same command on every
node). A single-device run needs no launcher at all: `forge train <overrides>`.
Add `--dry-run` (or launch.dry_run=true) to print the command only.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from typing import Optional

from forge_lm.launch.config import compose, split_overrides
from forge_lm.trainer.config import ConfigError
from forge_lm.trainer.config_store import config_dir_as_override


def torchrun_command(
    python: str,
    nnodes: int,
    nproc_per_node: int,
    overrides: Sequence[str],
    rdzv_endpoint: Optional[str] = None,
    rdzv_id: Optional[str] = None,
) -> list[str]:
    """`python -m torch.distributed.run ... -m forge_lm.trainer.train <overrides>`.

    One node without an endpoint: --standalone (a local rendezvous on a free port). Otherwise c10d
    rendezvous at `rdzv_endpoint` (host:port of the first node); `rdzv_id` names the job's rendezvous.
    Workers are not restarted by torchrun (--max-restarts=0): a failed job is resumed by requeueing it.
    """
    cmd = [python, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ConfigError(
                f"launch.nodes={nnodes} needs launch.rdzv_endpoint=host:port (the first node), the same on every node."
            )
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
        if rdzv_id:
            cmd.append(f"--rdzv-id={rdzv_id}")
    cmd += [f"--nproc-per-node={nproc_per_node}", "--max-restarts=0", "-m", "forge_lm.trainer.train", *overrides]
    return cmd


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    dry_run = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    try:
        args = config_dir_as_override(args)  # the job gets it as hydra.searchpath, an absolute path
        cfg, launch = compose(args)
        train_overrides, _ = split_overrides(args)
        cmd = torchrun_command(
            launch.python or sys.executable,
            launch.nodes,
            launch.gpus_per_node,
            train_overrides,
            rdzv_endpoint=launch.rdzv_endpoint,
            rdzv_id=cfg.name,
        )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), flush=True)
    if dry_run or launch.dry_run:
        return 0
    os.execvp(cmd[0], cmd)  # replaces this process: signals and the exit status are torchrun's own


if __name__ == "__main__":
    sys.exit(main())
