"""Parallelism: the device mesh, one `parallelize` (TP+SP -> AC -> compile -> FSDP2), pipeline stages, DeepSpeed."""
