"""Shared fixtures: seeded runs, isolated cache/results roots, tiny random models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# train.sparse_below: auto times the sparse and the dense step on this machine; at tiny shapes that is
# noise, and a timing-dependent path would make reruns of tiny models differ. The suite pins it (to the
# old fixed default); tests/test_sparse_probe.py unpins it to test the probe itself.
SPARSE_PIN = "0.05"
os.environ.setdefault("HIDDEN_SIGNATURES_SPARSE_BELOW", SPARSE_PIN)

ROOT = Path(__file__).resolve().parents[1]
TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Python's documentation explains modules, "
    "classes and functions; every docstring describes what a function returns and why. "
    "A crosscoder reads the residual stream of two models and writes it back. "
) * 40


def artifacts_root() -> Path:
    """Where end-to-end tests leave executed notebooks for the nbval pass (see run_all.sh test)."""
    return Path(os.environ.get("HS_TEST_ARTIFACTS", ROOT / ".test-artifacts"))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def isolated_roots(tmp_path, monkeypatch):
    """Cache, results and figures under tmp_path for this test only."""
    for env, sub in (("HIDDEN_SIGNATURES_CACHE", "cache"), ("HIDDEN_SIGNATURES_RESULTS", "results"),
                     ("HIDDEN_SIGNATURES_FIGURES", "figures")):
        monkeypatch.setenv(env, str(tmp_path / sub))
    return tmp_path


def train_tokenizer(vocab_size: int = 200, text: str = TINY_TEXT, bos: str = "<s>"):
    """A byte-level BPE tokenizer trained on `text`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>")


def tiny_config(arch: str, n_layers: int = 4, hidden: int = 32, vocab: int = 300):
    """A tiny config of one of the paper's architectures (no downloads)."""
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=512,
                          bos_token_id=0, eos_token_id=1)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=512,
                             bos_token_id=0, eos_token_id=1)
    if arch == "gemma2":
        return Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    raise ValueError(arch)


def save_tiny_model(directory: Path, arch: str = "llama", n_layers: int = 4, hidden: int = 32,
                    seed: int = 0, tokenizer=None) -> Path:
    """Build a tiny random model + tokenizer and save them as an HF directory (safetensors)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or train_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers, hidden, vocab=len(tokenizer)))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    paragraphs = [f"Paragraph {i}. " + TINY_TEXT[i * 37: i * 37 + 900] for i in range(40)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def _chromium_or_none() -> str | None:
    """The Chromium kaleido would use, or None when the machine has none."""
    from hidden_signatures.analysis import figures

    try:
        return figures.find_chromium()
    except RuntimeError:
        return None


needs_chromium = pytest.mark.skipif(
    _chromium_or_none() is None,
    reason="no Chrome/Chromium on this machine (apt-get install -y chromium); PNG export cannot run")


@pytest.fixture
def bf16_machine(monkeypatch) -> None:
    """The shipped params as on a CPU with AMX (elsewhere `fp32_cpu` or `bf16_without_amx` sections apply)."""
    monkeypatch.setenv("HIDDEN_SIGNATURES_PRECISION", "bfloat16")
    monkeypatch.setenv("HIDDEN_SIGNATURES_AMX", "1")


@pytest.fixture
def bf16_without_amx_machine(monkeypatch) -> None:
    """The shipped params as on a CPU with AVX512-BF16 but no AMX: their `bf16_without_amx` sections apply."""
    monkeypatch.setenv("HIDDEN_SIGNATURES_PRECISION", "bfloat16")
    monkeypatch.setenv("HIDDEN_SIGNATURES_AMX", "0")


@pytest.fixture
def fp32_machine(monkeypatch) -> None:
    """The shipped params as on a CPU without native bf16: their `fp32_cpu` sections apply."""
    monkeypatch.setenv("HIDDEN_SIGNATURES_PRECISION", "float32")
