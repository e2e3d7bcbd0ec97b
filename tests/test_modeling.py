"""The Theseus wrapper: exactness at p=0 / p=1 / eval, block split, init, freezing, round trip."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from conftest import tiny_config
from theseus_deploy.errors import UsageError
from theseus_deploy.modeling import TheseusModel, find_layers, init_indices, split_blocks

ARCHS = ["bert", "roberta", "mpnet"]


def _model(arch, layers=4, dropout=0.0, seed=0):
    cfg = tiny_config(arch, layers)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _perturb_successor(tm, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tm.successor_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ARCHS)
def test_p0_is_predecessor_exactly(arch):
    pred = _model(arch)
    ref = pred(**_batch()).logits
    tm = TheseusModel(pred, 2)
    _perturb_successor(tm)
    tm.train()
    assert tm.sample(0.0) == [False, False]
    assert torch.equal(tm(**_batch()).logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_p1_and_eval_are_successor_exactly(arch):
    tm = TheseusModel(_model(arch, layers=5), 3)
    _perturb_successor(tm)
    succ = tm.to_successor()
    assert succ.config.num_hidden_layers == 3
    ref = succ(**_batch()).logits
    tm.train()
    assert tm.sample(1.0) == [True, True, True]
    assert torch.equal(tm(**_batch()).logits, ref)
    tm.eval()
    tm.sample(0.0)  # draws are ignored in eval mode: only the successor runs
    assert torch.equal(tm(**_batch()).logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_successor_round_trips(arch, tmp_path):
    tm = TheseusModel(_model(arch), 2)
    _perturb_successor(tm)
    tm.eval()
    expected = tm(**_batch()).logits
    tm.to_successor().save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2
    assert torch.equal(loaded(**_batch()).logits, expected)


def test_mixed_draw_runs_the_chosen_path():
    pred = _model("bert", layers=4)
    tm = TheseusModel(pred, 2)
    _perturb_successor(tm)
    tm.train()
    for m, use in zip(tm.modules_, [True, False]):
        m.use_successor = use
    mixed = tm(**_batch()).logits
    # reference: a plain model whose layer list is successor 0, then predecessor layers 2 and 3
    import copy
    ref_model = copy.deepcopy(pred)
    ref_model.bert.encoder.layer = nn.ModuleList(
        [copy.deepcopy(tm.modules_[0].successor), *copy.deepcopy(tm.modules_[1].predecessor)])
    ref_model.eval()
    assert torch.equal(mixed, ref_model(**_batch()).logits)


def test_uneven_blocks_and_init():
    assert split_blocks(12, 6) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert split_blocks(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_blocks(6, 4) == [[0, 1], [2, 3], [4], [5]]
    assert init_indices(7, 3, "bottom") == [0, 1, 2]
    assert init_indices(7, 3, "top") == [4, 5, 6]
    assert init_indices(7, 3, "uniform") == [0, 3, 5]
    tm = TheseusModel(_model("bert", layers=7), 3, init="top")
    assert [len(m.predecessor) for m in tm.modules_] == [3, 2, 2]
    # successor i starts as an exact copy of predecessor layer init_from[i]
    for m, src in zip(tm.modules_, [4, 5, 6]):
        a = dict(m.successor.named_parameters())
        layer = [mm for mm in tm.modules_ for mm in mm.predecessor][src]
        for k, v in layer.named_parameters():
            assert torch.equal(a[k], v)
    with pytest.raises(UsageError, match="between 1 and"):
        split_blocks(4, 5)
    with pytest.raises(UsageError):
        TheseusModel(_model("bert", layers=4), 0)


def test_default_depth_is_half():
    assert TheseusModel(_model("bert", layers=4)).num_modules == 2
    assert TheseusModel(_model("bert", layers=5)).num_modules == 3


def test_only_successor_trainable_and_head_flag():
    tm = TheseusModel(_model("bert"), 2)
    trainable = {id(p) for p in tm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in tm.successor_parameters()}
    tm.unfreeze_head()
    names = {n for n, p in tm.model.named_parameters() if p.requires_grad and "successor" not in n}
    assert names == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}


def test_bernoulli_one_draw_per_module():
    tm = TheseusModel(_model("bert", layers=4), 4)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([tm.sample(0.3, g) for _ in range(2000)], dtype=torch.float)
    assert draws.shape == (2000, 4)
    assert torch.allclose(draws.mean(0), torch.full((4,), 0.3), atol=0.04)
    # independent across modules: not all equal in most batches
    assert (draws.std(1) > 0).float().mean() > 0.5


def test_unsupported_model_names_what_was_looked_for():
    with pytest.raises(UsageError, match=r"no list of encoder layers at base_model\.encoder\.layer"):
        find_layers(nn.Linear(2, 2))
