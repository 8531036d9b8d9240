"""Tests of models.py: names and hub ids, loading (and what a damaged or unreachable model says), and the
written-down architectures that --random_init builds without a download."""
import json
import os
import time

import pytest
import torch

import eval as ev
import models
import opensir as O
from conftest import rows

FAST = ["--rounds_per_step", "1", "--n_refs", "2", "--teacher_group", "4", "--student_group", "4",
        "--teacher_max_new_tokens", "24", "--student_max_new_tokens", "16", "--init_pool_size", "0",
        "--warmup_steps", "0", "--lr", "1e-3"]


# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------

def test_unknown_model_name_lists_short_names():
    with pytest.raises(ValueError, match="gemma-2-2b-it"):
        models.resolve_model("gemma2b", O.PROMPTS)
    assert models.resolve_model("gemma-2-2b-it", O.PROMPTS) == "google/gemma-2-2b-it"


# ------------------------------------------------------------------------------------------------
# loading: damaged weights, hub ids that cannot be fetched
# ------------------------------------------------------------------------------------------------

def test_damaged_weights_name_the_checkpoint(copy):
    ckpt = os.path.join(copy, "ckpt-00002")
    with open(os.path.join(ckpt, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(OSError, match="(?s)could not load .*ckpt-00002.*damaged"):
        O.load_model(ckpt, device="cpu")


def test_offline_hub_id_fails_fast_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    d = tmp_path / "data"
    d.mkdir()
    (d / "gsm8k.jsonl").write_text(json.dumps({"question": "What is 1+1?", "answer": "#### 2"}) + "\n")
    t0 = time.time()
    with pytest.raises(SystemExit) as err:
        ev.main(["--model", "no-org/no-such-model", "--data-dir", str(d), "--benchmarks", "gsm8k",
                 "--out", str(tmp_path / "o")])
    msg = str(err.value.code)
    assert "nor in the local hub cache, and HF_HUB_OFFLINE is set" in msg and "\n" not in msg
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        O.load_model("no-org/no-such-model", device="cpu")
    assert time.time() - t0 < 5


# ------------------------------------------------------------------------------------------------
# --random_init: architectures written down, built without a download
# ------------------------------------------------------------------------------------------------

TOYS = {
    "toy-llama": dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "toy-gemma2": dict(model_type="gemma2", vocab_size=300, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True),
}


@pytest.mark.parametrize("toy", sorted(TOYS))
def test_random_init_builds_architecture_without_download(monkeypatch, tmp_path, toy):
    monkeypatch.setitem(models.ARCHITECTURES, toy, TOYS[toy])
    model, tok = O.load_model(toy, device="cpu", random_init=True, seed=3)
    again, _ = O.load_model(toy, device="cpu", random_init=True, seed=3)
    assert len(tok) == model.config.vocab_size == 300
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    if toy == "toy-gemma2":
        assert model.config._attn_implementation == "eager"  # keeps the attention soft-capping
    # every teacher output counts as legal, so a round reaches the student phase at full size
    out = str(tmp_path / "run")
    O.main(["--model", toy, "--random_init", "--out", out, "--steps", "1", *FAST])
    m = rows(os.path.join(out, "metrics.jsonl"))[0]
    assert m["teacher/legal_rate"] == 1.0 and m["train/student_seqs"] == 4
    with pytest.raises(ValueError, match="gemma-2-2b-it"):
        O.load_model("nope", random_init=True)


def test_written_down_architectures_are_the_published_models():
    """Parameter counts of the real checkpoints (meta device: nothing is allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    published = {"gemma-2-2b-it": 2_614_341_888, "llama-3.2-3b-instruct": 3_212_749_824,
                 "qwen2.5-1.5b-instruct": 1_543_714_304}
    assert set(published) == set(models.ARCHITECTURES) == set(models.MODELS)
    for name, arch in models.ARCHITECTURES.items():
        arch = dict(arch)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
        assert sum(p.numel() for p in model.parameters()) == published[name], name


def test_real_gemma_llama_qwen_architectures_are_valid():
    from transformers import AutoConfig
    for name, arch in models.ARCHITECTURES.items():
        arch = dict(arch)
        cfg = AutoConfig.for_model(arch.pop("model_type"), **arch)
        assert cfg.vocab_size > 100_000, name
    assert models.attention_for("gemma2") == "eager" and models.attention_for("llama") == "sdpa"
