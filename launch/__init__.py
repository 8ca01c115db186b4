"""Launching runs: torchrun flags, SLURM submission with requeue, and a planner that says whether a layout fits.

A single-device run needs no launcher: `forge train <overrides>`. The tools here take the same
overrides plus `launch.*` (launch/config.py):

    forge torchrun <overrides> launch.gpus_per_node=8          # torchrun with its flags filled in
    forge slurm submit <overrides> launch.nodes=2 ...          # sbatch, requeue, resume
    forge plan <overrides> launch.nodes=8 launch.gpu=h100      # mesh, memory per rank, step time
    forge memcheck <overrides>                                 # the plan against a real run

See docs/launch.md.
"""
