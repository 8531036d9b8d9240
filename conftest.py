"""Fixtures and helpers shared by the test files: a small random Llama saved to disk with a byte-level BPE
tokenizer trained in-process, the built-in tiny model, log readers, and torchrun launches."""
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as ev
import models
import opensir as O
import tiny as T

HERE = os.path.dirname(os.path.abspath(__file__))
# timings and the number of ranks: the only metrics that may differ between two runs of the same config
NOT_COMPARED = ("sec/", "tok_per_sec/", "peak_mem", "ranks")
GOOD = ("<think>uses area not sums</think>\n<problem>A square has side 3 cm. What is its area?</problem>\n"
        "<concepts>area of a square, multiplication</concepts>")
CORPUS = [O.teacher_prompt("What is 1+1?"), O.student_prompt("What is 2+3?"),
          "<think>new idea</think>\n<problem>What is 7 times 8?</problem>\n<concepts>multiplication, "
          "arithmetic facts</concepts>", "Therefore, the final answer is: $\\boxed{56}$"] * 20


def make_tokenizer():
    """A byte-level BPE with a chat template, trained on CORPUS (no download)."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(tk_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("<s>{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    return tok


def tiny_path() -> str:
    """The built-in tiny model's directory in the shared cache (built on first use)."""
    return T.ensure_tiny_model(O.PROMPTS, models.cache_root())


def sample(model, tok, prompts: list, max_new_tokens: int, temperature: float = 1.0, top_k: int = 50,
           top_p: float = 1.0, batch_size: int = 64, engine: str = "generate", greedy: bool = False,
           kv_cache_gib: float = 0.0, desc: str = "", seed: int = 0) -> list:
    """opensir.generate through the named engine, one seed per prompt (seed, seed + 1, ...)."""
    import engines
    eng = engines.make_engine(engine, model, O.eos_token_ids(model, tok), tok.pad_token_id, batch_size, kv_cache_gib)
    return O.generate(eng, tok, prompts, max_new_tokens, engines.Sampling(temperature, top_k, top_p, greedy),
                      [seed + i for i in range(len(prompts))], desc)


# small eval.py inputs: a two-problem GSM8K file, and eval.py's exit message
GSM = [{"question": "What is 1+1?", "answer": "#### 2"}, {"question": "What is 2+2?", "answer": "#### 4"}]


def data_dir(tmp_path, rows=GSM):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def eval_exit(argv):
    with pytest.raises(SystemExit) as err:
        ev.main(argv)
    return str(err.value.code)


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def metrics(out):
    """metrics.jsonl of a run without the timing keys."""
    return [{k: v for k, v in m.items() if not k.startswith(NOT_COMPARED)} for m in rows(os.path.join(out, "metrics.jsonl"))]


def weights(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def params(path):
    return {k: v.clone() for k, v in weights(path).items()}


def pool(ckpt):
    import runs
    return runs.checkpoint_pool(ckpt)


def torchrun(n: int, script: str, args: list) -> str:
    """Run `torchrun --standalone --nproc_per_node n script args` and return its output; fail with it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           os.path.join(HERE, script), *args], capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
    """A small random Llama and make_tokenizer(), saved to disk (loaded back through the real loading code)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    path = str(tmp_path_factory.mktemp("small"))
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small(small_dir):
    return O.load_model(small_dir, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    """The real tiny model and tokenizer from the shared cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tiny_path()
    torch.set_num_threads(1)  # small matmuls: two threads on a busy 2-core machine are many times slower than one
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


FAST_TINY = ["--rounds_per_step", "1", "--init_pool_size", "0"]


def files(d):
    """Every file under d with its bytes (the lock file aside): what 'nothing lost or overwritten' compares."""
    out = {}
    for root, _, names in os.walk(d):
        for n in set(names) - {".lock"}:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A finished two-step tiny run (FAST_TINY): ckpt-00001 (state, no optimizer), ckpt-00002 (complete), logs."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    O.main(["--model", "tiny", "--steps", "2", "--out", out, *FAST_TINY])
    return out


@pytest.fixture
def copy(run, tmp_path):
    """A copy of `run` that a test may damage."""
    import shutil
    out = str(tmp_path / "run")
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock"))
    return out
