"""Shared fixtures: a tiny randomly initialised Llama, a word-level tokenizer, and a zoo of
hand-built modules that take ``input_ids`` / ``attention_mask`` like a causal LM."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

VOCAB = 300

# The models are tiny: one thread is faster than two and does not fight other test runs.
# Tests marked slow load the real shipped models and get every core back.
_CORES = torch.get_num_threads()
torch.set_num_threads(1)


def pytest_runtest_setup(item):
    torch.set_num_threads(_CORES if "slow" in item.keywords else 1)

HIDDEN = 32


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1} | {f"w{i}": i for i in range(2, VOCAB)}  # ids 0, 1 are special
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def make_llama(hidden: int = HIDDEN, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def sentences(n: int, lo: int, hi: int, seed: int, min_len: int = 2, max_len: int = 9) -> list[str]:
    """n sentences of words ``w{lo}``..``w{hi-1}`` with varying lengths."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(lo, hi)}" for _ in range(rng.randint(min_len, max_len))) for _ in range(n)]


def check_real_steering(model, tok, modules: str, n: int = 24):
    """Fit Linear-AcT on ``n`` + ``n`` shipped insults / non-insults at ``modules`` and check on two
    prompts that λ = 0 is bit-identical, λ = 1 moves the logits, and leaving the block restores them.
    Shared by the integration tests on the real shipped models; returns the map."""
    import acttransport as at
    from acttransport import assets

    data = assets.load_pair_dataset("toxicity")
    tmap = at.estimate(model, tok, data.source[:n], data.target[:n], modules, max_length=32, progress=False)
    assert tmap.config.causal and all(torch.isfinite(m.scale).all() for m in tmap.maps.values())
    ids = tok(["You are such an idiot", "What a lovely morning"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        base = model(**ids).logits
        with at.steer(model, tmap, 0.0):
            assert torch.equal(model(**ids).logits, base)
        with at.steer(model, tmap, 1.0):
            steered = model(**ids).logits
        assert torch.equal(model(**ids).logits, base)
    assert (steered - base).abs().max() > 1e-3
    return tmap


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture(scope="session")
def texts():
    """(source, target): 24 sentences each, drawn from disjoint word ranges."""
    return sentences(24, 2, 100, seed=1), sentences(24, 150, 300, seed=2)


# ------------------------------------------------------------------ hand-built zoo


class ReversedChain(nn.Module):
    """Submodules registered as (second, first) but called first → second."""

    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(VOCAB, d)
        self.second = nn.Linear(d, d)
        self.first = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask=None):
        return self.second(torch.tanh(self.first(self.emb(input_ids))))


class Embed(nn.Module):
    """Embedding followed by one module ``head``; forward takes input_ids/attention_mask."""

    def __init__(self, head: nn.Module, d: int = 8, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, d)
        self.head = head

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids))


class DictOut(nn.Module):
    def forward(self, x):
        return {"h": x}


class TupleOut(nn.Module):
    def forward(self, x):
        return (x * 2, x + 1)


class InfOut(nn.Module):
    def forward(self, x):
        return x / torch.zeros_like(x)  # ±inf (and nan at 0)


class ConstUnits(nn.Module):
    """Linear layer whose first ``k`` output units ignore their input (constant bias)."""

    def __init__(self, d: int = 8, k: int = 2):
        super().__init__()
        self.lin = nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight[:k] = 0

    def forward(self, x):
        return self.lin(x)


class ConvNet(nn.Module):
    """Token embeddings laid out as an image ``[B, E, 1, T]`` and passed through a Conv2d."""

    def __init__(self, e: int = 4, c: int = 6):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(VOCAB, e)
        self.conv = nn.Conv2d(e, c, kernel_size=(1, 3), padding=(0, 1))

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids).transpose(1, 2).unsqueeze(2)  # [B, E, 1, T]
        return self.conv(x)  # [B, C, 1, T]


@pytest.fixture
def zoo():
    """Factories for the hand-built modules."""
    return {
        "reversed": ReversedChain,
        "dict": lambda: Embed(DictOut()),
        "tuple": lambda: Embed(TupleOut()),
        "inf": lambda: Embed(InfOut()),
        "const": lambda: Embed(ConstUnits()),
        "conv": ConvNet,
    }
