"""A prepared shard holding a token id beyond the vocabulary stops training with the shard named, not an
IndexError from inside the embedding."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from forge_lm.data.sources import DataError
from forge_lm.trainer.train import run
from tests.conftest import compose_config, tiny_overrides


def test_an_out_of_range_id_in_a_prepared_shard_names_the_shard(shared_output_root, tmp_path):
    common = (
        "trainer.max_steps=2",
        "eval.every=0",
        "eval.prompts=[]",
        "trainer.export_hf=false",
        "trainer.plot=false",
    )
    first = run(compose_config(*tiny_overrides(shared_output_root, "clean_shards", *common)))
    prepared = next(p.parent for p in (first.run_dir.parent / "prepared").rglob("train/manifest.json"))
    copy = tmp_path / "prepared"
    shutil.copytree(prepared.parent, copy)  # a private copy of the prepared data, to damage
    shard = sorted((copy / "train").glob("*.tokens.bin"))[0]
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[:] = 60000  # every row: whichever the shuffled order reads first
    tokens.tofile(shard)
    with pytest.raises(
        DataError, match=rf"{shard.name} row \d+ holds token id 60000, outside the vocabulary"
    ):
        run(
            compose_config(
                *tiny_overrides(shared_output_root, "bad_shards", *common, f"data.prepared_dir={copy}")
            )
        )
