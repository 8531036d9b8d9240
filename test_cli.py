"""Tests of cli.py: the command line generated from Config, the precedence of flags over the small models'
defaults over the --recipe preset over Config's defaults, the validation tables' messages, and flags refused
(bad values, flags that would be ignored) before --out is touched or any model loads."""
import dataclasses
import json
import os
import re

import pytest
import torch

import cli
import opensir as O
from conftest import HERE


# ------------------------------------------------------------------------------------------------
# flags and help, generated from Config
# ------------------------------------------------------------------------------------------------

def test_cli_generated_from_config(capsys):
    cfg = O.config_from_args(["--model", "tiny", "--n-refs", "3", "--w_div", "0", "--no-grad-ckpt"])
    assert (cfg.n_refs, cfg.w_div, cfg.grad_ckpt) == (3, 0.0, False)
    assert cfg.rounds_per_step == O.TINY_DEFAULTS["rounds_per_step"]  # tiny defaults fill the rest
    assert O.config_from_args(["--model", "tiny", "--rounds_per_step", "5"]).rounds_per_step == 5
    assert O.config_from_args(["--model", "some/model"]).rounds_per_step == 16  # paper defaults
    assert "tiny model defaults" in capsys.readouterr().out
    helps = cli.field_help(O.Config)
    assert all(f.name in helps for f in dataclasses.fields(O.Config))


def test_readme_flags_table_matches_config():
    """The README's flags table is generated from Config; this catches drift."""
    readme = open(os.path.join(HERE, "README.md")).read()
    for f in dataclasses.fields(O.Config):
        assert f"| `--{f.name}` | `{f.default!r}` |" in readme, f.name


# ------------------------------------------------------------------------------------------------
# precedence: your flags > the small models' defaults > the --recipe preset > Config's defaults
# ------------------------------------------------------------------------------------------------

def test_user_flags_win_over_the_preset(capsys):
    cfg = O.config_from_args(["--model", "a/b", "--recipe", "paper", "--select_scope", "round"])
    assert cfg.recipe == "paper" and cfg.select_scope == "round"  # the user's flag
    assert {k: getattr(cfg, k) for k in O.RECIPE_FIELDS if k != "select_scope"} == \
        {k: v for k, v in O.RECIPES["paper"].items() if k != "select_scope"}
    assert cfg.warmup_steps == 20
    assert "recipe paper" in capsys.readouterr().out
    # tiny: the scale-down defaults still apply over the preset (warm-up 0), the user's flags over both
    tiny = O.config_from_args(["--model", "tiny", "--recipe", "paper"])
    assert (tiny.warmup_steps, tiny.start_pool, tiny.rounds_per_step) == (0, "seed", 2)
    assert O.config_from_args(["--model", "tiny", "--recipe", "paper", "--warmup_steps", "7"]).warmup_steps == 7
    assert O.config_from_args(["--model", "a/b"]) == O.Config(model="a/b")  # code = Config's defaults


# ------------------------------------------------------------------------------------------------
# the validation tables: one message per field, naming the flag and the bad value
# ------------------------------------------------------------------------------------------------

def test_table_errors_name_the_flag_and_the_bad_value():
    cfg = O.Config(n_refs=0, top_p=1.5, loss_agg="mean", band_lo=-0.1, seed=2**32, temperature=0.0)
    errors = cli.table_errors(cfg, O.CHOICES, O.BOUNDS)
    assert "--n_refs must be >= 1, got 0" in errors
    assert "--top_p must be in (0, 1], got 1.5" in errors
    assert "--loss_agg must be one of token, sequence, role, constant, got 'mean'" in errors
    assert "--band_lo must be in [0, 1], got -0.1" in errors
    assert "--seed must be in [0, 4294967296), got 4294967296" in errors
    assert "--temperature must be > 0, got 0.0" in errors
    assert len(errors) == 6
    assert cli.table_errors(O.Config(), O.CHOICES, O.BOUNDS) == []  # the defaults pass
    # every field a table names is a Config field, and every bound parses
    fields = {f.name for f in dataclasses.fields(O.Config)}
    assert set(O.CHOICES) <= fields and set(O.BOUNDS) <= fields and set(O.NEEDS) <= fields


def test_main_rejects_bad_flags_before_loading(tmp_path):
    with pytest.raises(SystemExit, match="need band_lo <= band_hi, got 0.9, 0.1"):
        O.main(["--model", "no-such-model", "--band_lo", "0.9", "--band_hi", "0.1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, msg", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--w_div", "nan"], "--w_div must be a finite number, got nan"),
    (["--seed", "-1"], "--seed must be in [0, 4294967296), got -1"),
    (["--seed_problem", "  "], "--seed_problem is blank"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0, got -1.0"),
    (["--threads", "100000"], "--threads must be in [0, 1024], got 100000"),
    (["--attn", "fast"], "--attn must be one of auto, eager, sdpa, flash_attention_2, flash_attention_3, flex_attention, got 'fast'"),
    (["--teacher_max_new_tokens", "1000000000"], "--teacher_max_new_tokens must be in [1, 131072], got 1000000000"),
    (["--adv_eps", "0"], "--adv_eps must be > 0, got 0.0"),
    (["--nonfinite_stop", "0"], "--nonfinite_stop must be >= 1, got 0"),
    (["--vllm_gpu_memory", "1.5"], "--vllm_gpu_memory must be in (0, 1], got 1.5"),
    (["--init_pool", "/no/such/pool.jsonl"], "--init_pool /no/such/pool.jsonl: cannot read it"),
])
def test_bad_flags_refused_before_out_is_created(tmp_path, flags, msg):
    out = tmp_path / "x"
    with pytest.raises(SystemExit, match=re.escape(msg)):
        O.main(["--model", "tiny", "--out", str(out), *flags])
    assert not out.exists()


@pytest.mark.parametrize("flags, msg", [
    (["--recipe", "papr"], "--recipe must be one of code, paper, got 'papr'"),
    (["--select_teacher_frac", "0", "--recipe", "paper"], "--select_teacher_frac must be in (0, 1], got 0.0"),
    (["--select_student_frac", "1.5", "--recipe", "paper"], "--select_student_frac must be in (0, 1], got 1.5"),
    (["--div_mode", "knn"], "--div_mode must be one of topk, nearest, got 'knn'"),
])
def test_bad_recipe_flags_are_refused_before_any_model_loads(tmp_path, flags, msg):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=re.escape(msg)):
        O.main(["--model", "no/such-model", "--out", str(out), *flags])
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# flags that another setting would ignore: refused, not ignored
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, msg", [
    (["--recipe", "paper", "--init_pool_size", "64"], "--init_pool_size has no effect with --start_pool seed"),
    (["--select_teacher_frac", "0.25"], "--select_teacher_frac has no effect with --select_scope round"),
    (["--recipe", "paper", "--div_topk", "3"], "--div_topk has no effect with --div_mode nearest"),
])
def test_flags_without_effect_are_refused_before_any_model_loads(tmp_path, flags, msg):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=re.escape(msg)):
        O.main(["--model", "no/such-model", "--out", str(out), *flags])
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_is_refused_before_out_is_created(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda asked for, but torch sees no GPU"):
        O.main(["--model", "tiny", "--device", "cuda", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_init_pool_file_contradicts_the_seed_start(tmp_path):
    f = tmp_path / "pool.jsonl"
    f.write_text(json.dumps({"problem": "What is 2 + 2?"}) + "\n")
    with pytest.raises(SystemExit, match="--init_pool"):
        O.config_from_args(["--recipe", "paper", "--init_pool", str(f)])


# ------------------------------------------------------------------------------------------------
# --config FILE: sits where typed flags sit; typed flags win over it
# ------------------------------------------------------------------------------------------------

def config_file(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_config_file_values_sit_with_the_flags_and_typed_flags_win(tmp_path):
    path = config_file(tmp_path, {"w_div": 0.5, "n_refs": 3, "rounds_per_step": 5, "lr": 1, "recipe": "paper"})
    cfg = O.config_from_args(["--config", path, "--model", "tiny", "--n_refs", "2"])
    assert (cfg.w_div, cfg.n_refs, cfg.rounds_per_step) == (0.5, 2, 5)  # the file over tiny's 2; the flag over the file
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # an integer is a number for a float field
    assert (cfg.recipe, cfg.select_scope, cfg.start_pool) == ("paper", "step", "seed")  # the preset under the file
    assert cfg.teacher_max_new_tokens == O.TINY_DEFAULTS["teacher_max_new_tokens"]  # unset: tiny's
    assert O.config_from_args(["--config", path, "--model", "tiny", "--recipe", "code"]).select_scope == "round"


@pytest.mark.parametrize("argv", [["--model", "tiny", "--recipe", "paper"], ["--model", "a/b", "--div_topk", "3"],
                                  ["--model", "toy", "--recipe", "paper", "--select_teacher_frac", "0.25"]])
def test_a_runs_own_config_json_gives_back_the_same_config(tmp_path, argv):
    """config.json holds every field, its defaults included (div_topk under div_mode nearest, init_pool_size
    under start_pool seed): fed back, none of them counts as a flag without effect."""
    cfg = O.config_from_args(argv)
    path = config_file(tmp_path, dataclasses.asdict(cfg))
    assert O.config_from_args(["--config", path]) == cfg
    assert O.config_from_args(["--config", path, "--steps", "7"]) == dataclasses.replace(cfg, steps=7)


def test_a_config_file_value_without_effect_is_refused(tmp_path):
    path = config_file(tmp_path, {"recipe": "paper", "div_topk": 3})
    with pytest.raises(SystemExit, match="--div_topk has no effect with --div_mode nearest"):
        O.config_from_args(["--config", path])


@pytest.mark.parametrize("data, msg", [
    ({"w_dvi": 0.0, "steps": 3}, "'w_dvi' is not a flag"),
    ({"steps": "10"}, "'steps' must be an integer, got \"10\""),
    ({"steps": 1.5}, "'steps' must be an integer, got 1.5"),
    ({"steps": True}, "'steps' must be an integer, got true"),
    ({"grad_ckpt": 1}, "'grad_ckpt' must be true or false, got 1"),
    ({"lr": "1e-5"}, "'lr' must be a number, got \"1e-5\""),
    ({"model": None}, "'model' must be a string, got null"),
    ({"config": "other.json"}, "'config' is not a flag"),
    ('{"steps": 3,}', "not valid JSON"),
    ('[["steps", 3]]', "expected a JSON object of flags"),
])
def test_a_bad_config_file_is_refused_naming_the_key_before_anything_loads(tmp_path, data, msg):
    out = tmp_path / "x"
    with pytest.raises(SystemExit, match=re.escape(msg)):
        O.main(["--config", config_file(tmp_path, data), "--model", "tiny", "--out", str(out)])
    assert not out.exists()


def test_a_missing_config_file_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=re.escape(f"--config {tmp_path}/none.json: cannot read it")):
        O.config_from_args(["--config", str(tmp_path / "none.json")])
