"""The paper recipes build the papers' models: parameter counts against the papers and FFJORD's own
code, InfoCNF's supervised code, concat layers against an independent formula, tied weights once."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fastcnf.cnf.concat import ConcatConv2d, ConcatConvNet, ConcatLinear, ConcatMLP
from fastcnf.methods import load_recipe
from fastcnf.data.base import DataBundle, DataSplit
from fastcnf.methods import build_model
from fastcnf.training.checkpoint import export_safetensors

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


def fake_bundle(shape, n=4):
    """A labelled image bundle of ``shape`` with no data files behind it."""
    return DataBundle(name="fake", train=DataSplit(torch.zeros(n, *shape, dtype=torch.uint8), torch.arange(n) % 10),
                      test=DataSplit(torch.zeros(2, *shape, dtype=torch.uint8), torch.arange(2)),
                      shape=shape, num_classes=10, levels=256, split="fake")


def trained_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ffjord_odenet_count(c: int, hidden=(64, 64, 64)) -> int:
    """Weights of FFJORD's multiscale ODEnet on ``c`` channels: concat 3x3 convolutions, each with
    one extra (time) input channel (lib/layers/diffeq_layers/basic.py ConcatConv2d)."""
    dims = [c, *hidden, c]
    return sum((a + 1) * b * 9 + b for a, b in zip(dims[:-1], dims[1:]))


def ffjord_odenvp_count(shape, n_blocks: int) -> int:
    """FFJORD's ODENVP (lib/odenvp.py) as train_cnf.py builds it: per scale, n_blocks CNFs, squeeze,
    n_blocks CNFs (no squeeze at the last scale), channels doubling per scale; each CNF also holds
    one ``sqrt_end_time`` parameter (train_T=True; never trained, but counted)."""
    c, h, w = shape
    n_scale = 0
    while h >= 4 and w >= 4:
        n_scale, h, w = n_scale + 1, h // 2, w // 2
    total = 0
    for i in range(n_scale):
        blocks = [c] * n_blocks + ([4 * c] * n_blocks if i < n_scale - 1 else [])
        total += sum(ffjord_odenet_count(ch) + 1 for ch in blocks)
        c *= 2
    return total


def test_ffjord_reference_count_matches_ffjord_readme_figures():
    # the figures FFJORD's code prints at commit 994864a (issue 17)
    assert ffjord_odenvp_count(MNIST, 2) == 800_646
    assert ffjord_odenvp_count(MNIST, 1) == 400_323


@pytest.mark.parametrize("recipe, shape, n_blocks", [
    ("mnist-ffjord", MNIST, 2), ("mnist-ffjord-1block", MNIST, 1), ("cifar10-ffjord-1block", CIFAR, 1),
    ("mnist-steer", MNIST, 1),
])
def test_ffjord_recipes_have_ffjords_weights(recipe, shape, n_blocks):
    """FFJORD's count less its untrained sqrt_end_time per block (fastcnf's fixed T is not trained)."""
    model = build_model(load_recipe(recipe), fake_bundle(shape))
    n_cnf = len(model.cnf_blocks())
    assert trained_parameters(model) == ffjord_odenvp_count(shape, n_blocks) - n_cnf


@pytest.mark.parametrize("recipe, shape, paper", [
    ("mnist-toflow", MNIST, 400_000), ("fmnist-toflow", MNIST, 400_000), ("cifar10-toflow", CIFAR, 670_000),
])
def test_toflow_recipes_have_table1_parameter_counts(recipe, shape, paper):
    """TO-FLOW Table 1: 400K (MNIST, Fashion-MNIST), 670K (CIFAR-10); T learned: one per block, as
    FFJORD counts it. CIFAR-10 builds 679,441 (1.4% above "670K"; docs/fidelity.md)."""
    model = build_model(load_recipe(recipe), fake_bundle(shape))
    count = trained_parameters(model)
    assert count == ffjord_odenvp_count(shape, 1)
    assert abs(count - paper) / paper < 0.015


def test_infocnf_saves_about_four_percent_of_ccnfs_parameters_on_cifar10():
    """InfoCNF §2.2: "z_y is only half the size of z, and InfoCNF requires 4% less parameters than CCNF"."""
    ccnf = build_model(load_recipe("cifar10-ccnf"), fake_bundle(CIFAR))
    info = build_model(load_recipe("cifar10-infocnf"), fake_bundle(CIFAR))
    d, k = ccnf.prior.dim, 10
    assert (ccnf.prior.cond_start, ccnf.prior.cond_size) == (0, d) == (0, 3 * 32 * 32)
    assert (info.prior.cond_start, info.prior.cond_size) == (0, d // 2)
    # q_phi: one-hot -> (mu, log sigma) and q_theta: z_c -> logits, over a z_c of half the size
    saved = (k * 2 * d + 2 * d + d * k) - (k * d + d + d // 2 * k)
    n_ccnf, n_info = trained_parameters(ccnf), trained_parameters(info)
    assert n_ccnf - n_info == saved
    assert 0.03 < saved / n_ccnf < 0.05


@pytest.mark.parametrize("recipe, shape", [("mnist-infocnf", MNIST), ("cifar10-infocnf", CIFAR),
                                           ("mnist-infocnf-learned-tol", MNIST)])
def test_infocnf_supervised_code_is_half_the_latent(recipe, shape):
    model = build_model(load_recipe(recipe), fake_bundle(shape))
    assert model.prior.cond_size * 2 == model.prior.dim == model.flow.latent_dim


def test_concat_layers_match_a_convolution_over_a_time_channel():
    torch.manual_seed(0)
    layer = ConcatConv2d(2, 5)
    x, t = torch.randn(3, 2, 6, 6), torch.tensor(0.7)
    ref = F.conv2d(torch.cat([torch.full((3, 1, 6, 6), 0.7), x], 1), layer.layer.weight, layer.layer.bias, padding=1)
    torch.testing.assert_close(layer(t, x), ref)
    lin = ConcatLinear(3, 4)
    v = torch.randn(5, 3)
    torch.testing.assert_close(lin(t, v), torch.cat([torch.full((5, 1), 0.7), v], 1) @ lin.layer.weight.T
                               + lin.layer.bias)
    # FFJORD's ODEnet: activations between layers only; the time channel is fed to every layer
    net = ConcatConvNet(1, (4, 4), "softplus")
    z = torch.randn(2, 1, 4, 4)
    h = F.softplus(net.layers[0](t, z))
    h = F.softplus(net.layers[1](t, h))
    torch.testing.assert_close(net(t, z), net.layers[2](t, h))
    assert ConcatMLP(2, (8,))(t, torch.randn(4, 2)).shape == (4, 2)


def test_concat_model_trains_one_step_with_learned_tolerances(tmp_path):
    """A concat model's gates see the state's channels (not the time channel) and its exact
    trace and Hutchinson estimate go through autograd."""
    from fastcnf.training.trainer import Trainer

    cfg = load_recipe("digits-cnf-learned-tol", ["model.layer_type=concat", "model.hidden_dims=[8]",
                                                 "train.iterations=1", "train.batch_size=16", "eval.max_examples=16",
                                                 "eval.figures=false", "solver.atol=1e-3", "solver.rtol=1e-3",
                                                 "tolerances.init_tol=1e-3", "eval.atol=1e-3", "eval.rtol=1e-3"])
    tr = Trainer(cfg, tmp_path, progress=False)
    assert all(g.body[0].in_channels == b.net.channels for g, b in zip(tr.model.tolerance_policy.gates,
                                                                       tr.model.cnf_blocks()))
    tr.train_step()


@pytest.mark.parametrize("overrides", [[], ["tolerances.policy=learned"]])
def test_safetensors_store_each_tensor_once(tmp_path, overrides):
    cfg = load_recipe("mnist-toflow", ["model.hidden_dims=[4]", *overrides])
    model = build_model(cfg, fake_bundle(MNIST))
    export_safetensors(model, tmp_path / "model.safetensors")
    stored = load_file(tmp_path / "model.safetensors")
    assert not any("odefunc" in k for k in stored)
    unique = {id(t): t.numel() for t in [*model.parameters(), *model.buffers()]}
    assert sum(v.numel() for v in stored.values()) == sum(unique.values())


@pytest.mark.parametrize("recipe, shape", [("digits-fast", (1, 8, 8)), ("mnist-fast", MNIST)])
def test_fast_presets_train_ffjords_model(recipe, shape):
    """digits-fast / mnist-fast (issue 18) change how FFJORD's one-block model is trained, never the
    model: same parameter shapes and count as FFJORD's code and the same initial weights as
    mnist-ffjord with one block per scale under one seed."""
    fast_cfg = load_recipe(recipe, ["seed=3"])
    ffjord_cfg = load_recipe("mnist-ffjord-1block", ["seed=3", f"data.name={fast_cfg.data.name}"])
    torch.manual_seed(3)
    fast = build_model(fast_cfg, fake_bundle(shape))
    torch.manual_seed(3)
    ffjord = build_model(ffjord_cfg, fake_bundle(shape))
    assert trained_parameters(fast) == ffjord_odenvp_count(shape, 1) - (5 if shape == MNIST else 3)
    for (n1, p1), (n2, p2) in zip(fast.state_dict().items(), ffjord.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    # what the presets change is training only: back-propagation, schedule, training tolerance, regularisers
    assert fast_cfg.model.layer_type == "concat" and fast_cfg.model.num_blocks == 1
    assert (fast_cfg.eval.atol, fast_cfg.eval.rtol) == (1e-5, 1e-5)
