"""Splice-in fidelity: a perfect reconstruction changes nothing; zeroing the stream does."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from hidden_signatures.analysis import splice


class PerfectCrosscoder(nn.Module):
    """Encodes to the inputs themselves and decodes them back exactly."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode(self, x_a, x_b):
        return torch.cat([x_a, x_b], dim=-1)

    def decode(self, f):
        return f[:, :32], f[:, 32:]


def tiny_side(tokenizer, seed: int, layer: int = 2) -> splice.SplicedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab=len(tokenizer))).eval()
    side = splice.SplicedModel(model, tokenizer, layer=layer)
    side.hf = model
    return side


def test_perfect_reconstruction_gives_zero_ce_increase(tiny_tokenizer):
    side_a, side_b = tiny_side(tiny_tokenizer, 1), tiny_side(tiny_tokenizer, 2)
    ids = [torch.randint(2, 200, (24,)) for _ in range(3)]
    pos = [torch.arange(1, 24)] * 3
    out = splice.fidelity(PerfectCrosscoder(), side_a, side_b, ids, ids, pos, pos, 2.0, 2.0, None)
    for side in ("A", "B"):
        assert out[side]["ce_increase"] == 0.0
        assert out[side]["kl_spliced"] == 0.0
        assert out[side]["kl_zero"] > 1e-4  # zeroing the stream does change the prediction
        assert out[side]["tokens"] == 3 * 22


def test_layer_input_matches_hidden_states(tiny_tokenizer):
    side = tiny_side(tiny_tokenizer, 3)
    ids = torch.randint(2, 200, (2, 12))
    ref = side.hf(ids, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(side.layer_input(ids), ref)
    torch.testing.assert_close(side.logits(ids), side.hf(ids).logits)


def test_next_token_ce_and_kl():
    logits = torch.randn(5, 7)
    ids = torch.randint(0, 7, (5,))
    pos = torch.tensor([0, 2, 4])  # position 4 has no next token and is dropped
    ce = splice.next_token_ce(logits, ids, pos)
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], ids[[1, 3]], reduction="none")
    torch.testing.assert_close(ce, expected)
    assert torch.all(splice.kl_from_clean(logits, logits, pos) == 0)
    assert torch.all(splice.kl_from_clean(logits, torch.randn(5, 7), pos) > 0)


def test_outlier_positions_are_not_spliced():
    xa = torch.ones(4, 16)
    xa[2] *= 1000
    pa = torch.tensor([1, 2, 3])
    keep_a, keep_b = splice._ordinary(xa, xa.clone(), pa, pa, 1.0, 1.0, 10.0)
    assert keep_a.tolist() == [1, 3] and keep_b.tolist() == [1, 3]


class RandomCrosscoder(nn.Module):
    """An imperfect crosscoder: a random ReLU encoder and random linear decoders."""

    def __init__(self, d: int = 32, width: int = 16):
        super().__init__()
        self.enc, self.dec_a, self.dec_b = nn.Linear(2 * d, width), nn.Linear(width, d), nn.Linear(width, d)

    def encode(self, x_a, x_b):
        return torch.relu(self.enc(torch.cat([x_a, x_b], dim=-1)))

    def decode(self, f):
        return self.dec_a(f), self.dec_b(f)


def plain_fidelity(cc, side_a, side_b, ids_a, ids_b, pos_a, pos_b, scale_a, scale_b, ratio) -> dict:
    """The straightforward computation fidelity must match: one sequence, one side, one forward pass at a time."""
    sums = {s: dict.fromkeys(splice.LOSSES, 0.0) | {"n": 0} for s in ("A", "B")}
    for ia, ib, pa, pb in zip(ids_a, ids_b, pos_a, pos_b):
        xa, xb = side_a.layer_input(ia[None])[0], side_b.layer_input(ib[None])[0]
        pa, pb = splice._ordinary(xa, xb, pa, pb, scale_a, scale_b, ratio)
        xa_hat, xb_hat = cc.decode(cc.encode(xa[pa] * scale_a, xb[pb] * scale_b))
        for s, side, ids, x, pos, hat in (("A", side_a, ia, xa, pa, xa_hat / scale_a),
                                          ("B", side_b, ib, xb, pb, xb_hat / scale_b)):
            clean = side.logits(ids[None])[0]
            spliced = side.logits(ids[None], splice.replaced(x, pos, hat)[None])[0]
            zeroed = side.logits(ids[None], splice.replaced(x, pos, torch.zeros_like(hat))[None])[0]
            sums[s]["ce_clean"] += splice.next_token_ce(clean, ids, pos).sum().item()
            sums[s]["ce_spliced"] += splice.next_token_ce(spliced, ids, pos).sum().item()
            sums[s]["ce_zero"] += splice.next_token_ce(zeroed, ids, pos).sum().item()
            sums[s]["kl_spliced"] += splice.kl_from_clean(clean, spliced, pos).sum().item()
            sums[s]["kl_zero"] += splice.kl_from_clean(clean, zeroed, pos).sum().item()
            sums[s]["n"] += int((pos < len(ids) - 1).sum())
    return {s: {k: v / max(1, acc["n"]) for k, v in acc.items() if k != "n"} | splice._deltas(acc)
            for s, acc in sums.items()}


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("lengths_b", [[20] * 5, [22, 22, 18, 22, 22]], ids=["same-length", "mixed-length"])
def test_batched_fidelity_matches_plain_computation(tiny_tokenizer, monkeypatch, layer, lengths_b):
    """Batching, skipped blocks and the chunked losses change nothing beyond float rounding."""
    side_a, side_b = tiny_side(tiny_tokenizer, 1, layer), tiny_side(tiny_tokenizer, 2, layer)
    monkeypatch.setattr(splice, "LOGITS_BUDGET", 4 * 22 * side_a.vocab)  # at most 2 sequences per batch
    monkeypatch.setattr(splice, "ROWS_BUDGET", 3 * side_a.vocab)  # 3 rows per loss step
    ids_a = [torch.randint(2, 200, (20,)) for _ in lengths_b]
    ids_b = [torch.randint(2, 200, (n,)) for n in lengths_b]
    pos_a = [torch.arange(1, 18)] * len(ids_a)
    pos_b = [torch.sort(torch.randperm(n - 1)[:17] + 1).values for n in lengths_b]  # paired with pos_a
    norms = side_a.layer_input(torch.stack(ids_a)).norm(dim=-1)
    ratio = norms.median().item() * 3.0 / 32 ** 0.5  # the outlier rule drops about half the positions
    args = (ids_a, ids_b, pos_a, pos_b, 3.0, 3.0, ratio)
    torch.manual_seed(0)
    cc = RandomCrosscoder()
    out, ref = splice.fidelity(cc, side_a, side_b, *args), plain_fidelity(cc, side_a, side_b, *args)
    assert out.keys() == ref.keys() and 0 < out["A"]["tokens"] < len(ids_a) * 17
    for s in ("A", "B"):
        assert out[s].keys() == ref[s].keys()
        assert out[s]["tokens"] == ref[s]["tokens"]
        ratio_free = {k: v for k, v in ref[s].items() if k != "loss_recovered"}
        assert {k: out[s][k] for k in ratio_free} == pytest.approx(ratio_free, rel=1e-5, abs=1e-6)
        # loss_recovered divides by ce_zero - ce_clean, only ~0.02 in a random tiny model: rounding is amplified
        assert out[s]["loss_recovered"] == pytest.approx(ref[s]["loss_recovered"], abs=1e-3)
        assert out[s]["kl_spliced"] > 1e-4  # the random crosscoder does change the prediction


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_spliced_logits_equal_logits_with_replaced_input(tiny_tokenizer, arch):
    """Skipping the blocks before the replaced input gives the same logits as running them."""
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab=len(tiny_tokenizer))).eval()
    side = splice.SplicedModel(model, tiny_tokenizer, layer=2)
    ids = torch.randint(2, 200, (3, 12))
    x, clean = side.clean(ids)
    torch.testing.assert_close(x, side.layer_input(ids), rtol=0, atol=0)
    torch.testing.assert_close(clean, side.logits(ids), rtol=0, atol=0)
    new = x + torch.randn_like(x)
    torch.testing.assert_close(side.spliced_logits(ids, new), side.logits(ids, new))


def test_chunks_are_equal_length_runs_within_budget(monkeypatch):
    side = SimpleNamespace(vocab=10)
    monkeypatch.setattr(splice, "LOGITS_BUDGET", 2 * 2 * 4 * 10)  # two sequences of 4 tokens
    ids_a = [torch.zeros(n) for n in (4, 4, 4, 3, 4, 4)]
    ids_b = [torch.zeros(n) for n in (4, 4, 4, 4, 4, 5)]
    assert splice._chunks(side, side, ids_a, ids_b) == [[0, 1], [2], [3], [4], [5]]
