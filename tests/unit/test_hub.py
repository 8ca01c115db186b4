"""Hugging Face interop: our model -> HF folder -> transformers (and back), with a real tiny tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local folders; never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM

from forge_lm.trainer.hub import from_hf, to_hf
from forge_lm.trainer.hub.convert import hf_config_to_model_config, model_config_to_hf
from forge_lm.trainer.model import Decoder, ModelConfig

VOCAB = 300
EOT = "<|endoftext|>"


class TinyTokenizer:
    """The duck-typed surface export needs (save, eos_id, bos_id) around a real byte-level BPE."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.eos_id = tok.token_to_id(EOT)
        self.bos_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def save(self, directory: str) -> None:
        self.tok.save(os.path.join(directory, "tokenizer.json"))


@pytest.fixture(scope="module")
def tokenizer() -> TinyTokenizer:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / name) for name in ("textwrap.py", "string.py", "heapq.py", "bisect.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train(files, trainer)
    assert tok.get_vocab_size() <= VOCAB
    return TinyTokenizer(tok)


def make_model(tie: bool = False, seed: int = 0) -> Decoder:
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        max_seq_len=128, rope_theta=500000.0, tie_embeddings=tie, init_std=0.1,
    )  # fmt: skip
    return Decoder.build(cfg, seed=seed).eval()


def load_transformers(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def assert_same_state(a: Decoder, b: Decoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer, tie: bool) -> None:
    model = make_model(tie)
    out = to_hf(model, tmp_path / "export", tokenizer=tokenizer)
    assert out == str(tmp_path / "export")
    files = sorted(p.name for p in Path(out).iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp folders left behind

    weights = load_file(f"{out}/model.safetensors")
    assert ("lm_head.weight" in weights) == (not tie)  # a tied matrix is stored once
    config = json.loads(Path(out, "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 500000.0
    assert config["eos_token_id"] == tokenizer.eos_id and config["bos_token_id"] is None
    generation = json.loads(Path(out, "generation_config.json").read_text())
    assert generation["max_length"] == 128 and generation["eos_token_id"] == tokenizer.eos_id

    hf = load_transformers(out)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    assert hf.config.rope_parameters["rope_theta"] == 500000.0
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_greedy_generation_matches_transformers(tmp_path, tokenizer) -> None:
    model = make_model()
    hf = load_transformers(to_hf(model, tmp_path / "export", tokenizer=tokenizer))
    prompt = torch.tensor([tokenizer.encode("def wrap(text, width=70):")])

    with torch.no_grad():
        theirs = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False
        )[0, prompt.shape[1] :].tolist()
        # Our side: recompute the whole sequence each step, take the argmax, stop after EOS like HF does.
        ids, ours = prompt, []
        for _ in range(20):
            nxt = model(ids)[0, -1].argmax().item()
            ours.append(nxt)
            if nxt == tokenizer.eos_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert len(ours) >= 1
    assert ours == theirs


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_from_hf_round_trip_is_exact(tmp_path, tokenizer, tie: bool) -> None:
    model = make_model(tie)
    loaded = from_hf(to_hf(model, tmp_path / "export", tokenizer=tokenizer))
    assert loaded.cfg == model.cfg
    assert_same_state(loaded, model)
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tie
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_from_hf_in_bf16_keeps_rope_in_fp32(tmp_path) -> None:
    model = make_model(tie=True)
    loaded = from_hf(to_hf(model, tmp_path / "export", dtype=torch.bfloat16), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.inv_freq.dtype == torch.float32 and torch.equal(loaded.inv_freq, model.inv_freq)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"


def test_sharded_export(tmp_path, tokenizer) -> None:
    model = make_model()
    out = Path(to_hf(model, tmp_path / "export", tokenizer=tokenizer, max_shard_bytes=60_000))
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert (out / "tokenizer.json").is_file()

    assert_same_state(from_hf(out), model)
    hf = load_transformers(str(out))
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-5


def test_reexport_replaces_and_failed_export_leaves_old_one(tmp_path, tokenizer) -> None:
    out = tmp_path / "export"
    to_hf(make_model(seed=0), out, tokenizer=tokenizer)
    newer = make_model(seed=1)
    to_hf(newer, out, tokenizer=tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert_same_state(from_hf(out), newer)

    class BrokenTokenizer(TinyTokenizer):
        def save(self, directory: str) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        to_hf(make_model(seed=2), out, tokenizer=BrokenTokenizer(tokenizer.tok))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # temp folder removed
    assert_same_state(from_hf(out), newer)  # the previous export is untouched


def test_pickle_only_folder_is_refused(tmp_path) -> None:
    folder = tmp_path / "bin_only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model_config_to_hf(make_model().cfg, None, 0, "float32")))
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors|safetensors.*pytorch_model\.bin"):
        from_hf(folder)


def test_missing_folder_config_or_weights(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        from_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(model_config_to_hf(make_model().cfg, None, 0, "float32"))
    )
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_hf(tmp_path)


def test_weight_name_mismatch_lists_missing_and_unexpected(tmp_path) -> None:
    out = Path(to_hf(make_model(), tmp_path / "export"))
    weights = load_file(str(out / "model.safetensors"))
    weights["model.layers.1.mlp.gate_proj.bias"] = torch.zeros(160)  # something we do not have
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        from_hf(out)
    message = str(err.value)
    assert "missing" in message and "model.layers.0.self_attn.k_proj.weight" in message
    assert "unexpected" in message and "model.layers.1.mlp.gate_proj.bias" in message


def test_unsupported_model_type_is_refused(tmp_path) -> None:
    model = make_model()
    out = Path(to_hf(model, tmp_path / "export"))
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "mamba"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mamba"):
        from_hf(out)


def base_llama_config() -> dict:
    return model_config_to_hf(make_model().cfg, None, 0, "float32")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3.*low_freq_factor"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"head_dim": 15}, "head_dim"),
        ({"num_attention_heads": 5}, "n_heads"),
    ],
)
def test_unsupported_llama_features_are_refused(change: dict, words: str) -> None:
    config = {**base_llama_config(), **change}
    with pytest.raises(ValueError, match=words):
        hf_config_to_model_config(config)


def test_rope_base_read_from_either_transformers_generation() -> None:
    config = base_llama_config()
    v4 = {k: v for k, v in config.items() if k != "rope_parameters"}  # 4.x: top-level rope_theta only
    v4["rope_theta"] = 1234.0
    assert hf_config_to_model_config(v4).rope_theta == 1234.0
    v5 = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling")}  # 5.x: dict only
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 4321.0}
    assert hf_config_to_model_config(v5).rope_theta == 4321.0
    assert hf_config_to_model_config(config) == make_model().cfg


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_from_hf_reads_a_folder_saved_by_transformers(tmp_path, tie: bool) -> None:
    """The other direction: a checkpoint written by transformers' own save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hc = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 250000.0}, tie_word_embeddings=tie,
    )  # fmt: skip
    hf = LlamaForCausalLM(hc).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()
    assert ours.cfg.rope_theta == 250000.0 and ours.cfg.tie_embeddings == tie
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5


# ---- families, MoE layouts, Hub push --------------------------------------------------------------------------


def test_export_refuses_a_knob_the_family_cannot_express(tmp_path) -> None:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, attn_softcap=20.0, qkv_bias=True)
    with pytest.raises(ValueError, match=r"model\.qkv_bias=True.*model\.attn_softcap=20\.0"):
        to_hf(Decoder.build(cfg, seed=0), tmp_path / "export")
    assert not (tmp_path / "export").exists()
    # Qwen2 always has q/k/v biases: a config without them is not a Qwen2.
    qwen2 = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, family="qwen2")
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM class always has True"):
        model_config_to_hf(qwen2, None, None, "float32")


def test_sharded_moe_export_round_trips_through_per_expert_tensors(tmp_path, tokenizer) -> None:
    from forge_lm.trainer.model.families import preset

    cfg = preset("mixtral_tiny", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, ffn_dim=48,
                 moe=dict(num_experts=4, top_k=2))  # fmt: skip
    model = Decoder.build(cfg, seed=0).eval()
    out = Path(to_hf(model, tmp_path / "export", tokenizer=tokenizer, max_shard_bytes=40_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    # The Hub layout of Mixtral checkpoints: one 2-D tensor per expert (what transformers 4.x and 5.x read).
    assert {f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)} <= names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    loaded = from_hf(out)
    assert loaded.cfg == model.cfg
    assert_same_state(loaded, model)
    assert len(set(index["weight_map"].values())) > 2  # experts really were spread over shards


def test_missing_expert_is_reported(tmp_path) -> None:
    from forge_lm.trainer.model.families import preset

    cfg = preset("qwen3_moe_tiny", vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=4, ffn_dim=32,
                 moe=dict(num_experts=4, top_k=2))  # fmt: skip
    out = Path(to_hf(Decoder.build(cfg, seed=0), tmp_path / "export"))
    weights = load_file(str(out / "model.safetensors"))
    del weights["model.layers.0.mlp.experts.2.up_proj.weight"]
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.experts\.w3: experts \[2\]"):
        from_hf(out)


def test_push_to_hub_dry_run_lists_the_export_without_network(tmp_path, tokenizer) -> None:
    from forge_lm.trainer.hub import push_to_hub

    out = to_hf(make_model(), tmp_path / "export", tokenizer=tokenizer, max_shard_bytes=60_000)
    files = push_to_hub(out, "someone/tiny-llama", dry_run=True)
    shards = sorted(p.name for p in Path(out).glob("model-*.safetensors"))
    assert files == sorted(
        ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", *shards]
    )
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(out, "no-namespace", dry_run=True)
    with pytest.raises(ValueError, match="config.json"):
        push_to_hub(tmp_path, "someone/x", dry_run=True)
    Path(out, shards[0]).unlink()
    with pytest.raises(ValueError, match="missing"):
        push_to_hub(out, "someone/tiny-llama", dry_run=True)
