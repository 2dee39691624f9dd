"""Parameter selection, diagonal blocks and the flat parameter order (lightning_hessian.parameters)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import lightning_hessian as lh
from tests.helpers import cross_entropy_loss, reference_hessian, tiny

# --------------------------------------------------------------------------- selection


def test_params_selection_frozen_and_shared_parameters():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 2))
    model[4].bias.requires_grad_(False)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    parameters = list(model.parameters())
    op = lh.HessianOperator(model, cross_entropy_loss, [(x, y)], dtype=torch.float64)
    assert op.space.names == ("0.weight", "0.bias", "4.weight")
    assert op.shape == (9 + 3 + 6, 9 + 3 + 6)
    H = op.to_dense()
    torch.testing.assert_close(H, reference_hessian(model, cross_entropy_loss, [(x, y)]))
    sub = lh.hessian(model, cross_entropy_loss, [(x, y)], params="4.*", dtype=torch.float64)
    torch.testing.assert_close(sub, H[12:, 12:])
    # the tied weight is still one Parameter object, registered under both names
    assert all(a is b for a, b in zip(parameters, model.parameters(), strict=True))
    assert model[0].weight is model[2].weight and isinstance(model[2].weight, nn.Parameter)


def test_select_parameters_keeps_named_parameters_order_and_skips_frozen_ones():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    model[2].bias.requires_grad_(False)
    assert list(lh.select_parameters(model)) == ["0.weight", "0.bias", "2.weight"]
    assert list(lh.select_parameters(model, ["2.*", "0.bias"])) == ["0.bias", "2.weight"]
    selected = lh.select_parameters(model, "0.*")
    assert selected["0.weight"] is model[0].weight


def test_params_matching_nothing_is_rejected():
    model, data = tiny()
    with pytest.raises(ValueError, match=r"`params='conv\.\*'` selects no trainable parameter.*0\.weight"):
        lh.hessian(model, cross_entropy_loss, data, params="conv.*")


# --------------------------------------------------------------------------- blocks


def test_resolve_blocks_kinds_in_flat_order():
    names = ["weight", "enc.0.weight", "enc.0.bias", "head.weight"]
    assert lh.resolve_blocks(names, None) == {"model": tuple(names)}
    assert lh.resolve_blocks(names, "model") == {"model": tuple(names)}
    assert lh.resolve_blocks(names, "module") == {
        "root": ("weight",),
        "enc.0": ("enc.0.weight", "enc.0.bias"),
        "head": ("head.weight",),
    }
    assert list(lh.resolve_blocks(names, "parameter")) == names
    groups = lh.resolve_blocks(names, {"last": "head.*", "first": ["enc.*", "weight"]})
    assert groups == {"last": ("head.weight",), "first": ("weight", "enc.0.weight", "enc.0.bias")}


def test_overlapping_or_mistyped_blocks_are_rejected():
    names = ["a.weight", "a.bias"]
    with pytest.raises(ValueError, match="in both .*disjoint"):
        lh.resolve_blocks(names, {"x": "a.*", "y": "a.bias"})
    with pytest.raises(TypeError, match="`blocks` must be"):
        lh.resolve_blocks(names, 3)


def test_unknown_blocks_is_rejected():
    model, data = tiny()
    with pytest.raises(ValueError, match="`blocks='layer'` is not supported"):
        lh.hessian(model, cross_entropy_loss, data, blocks="layer")
    with pytest.raises(ValueError, match=r"`blocks\['x'\]='nothing\*'` matches no selected parameter"):
        lh.hessian(model, cross_entropy_loss, data, blocks={"x": "nothing*"})


def test_module_blocks_of_a_model_follow_its_modules():
    model = nn.Sequential(OrderedDict(embed=nn.Linear(2, 3), act=nn.Tanh(), head=nn.Linear(3, 1)))
    names = list(lh.select_parameters(model))
    assert list(lh.resolve_blocks(names, "module")) == ["embed", "head"]


# --------------------------------------------------------------------------- flat order


def test_flatten_unflatten_round_trip_in_named_parameters_order():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    space = lh.ParameterSpace.from_tensors(dict(model.named_parameters()))
    flat = space.flatten(dict(model.named_parameters()))
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat, expected)
    for name, tensor in space.unflatten(flat).items():
        torch.testing.assert_close(tensor, dict(model.named_parameters())[name].detach())


def test_parameter_space_sizes_slices_batches_and_subspaces():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    space = lh.ParameterSpace.from_tensors(dict(model.named_parameters()))
    assert space.sizes == (6, 3, 3, 1) and space.numel == 13
    assert space.slices() == {
        "0.weight": slice(0, 6),
        "0.bias": slice(6, 9),
        "1.weight": slice(9, 12),
        "1.bias": slice(12, 13),
    }
    batch = torch.arange(26.0).reshape(2, 13)
    pieces = space.unflatten(batch)
    assert pieces["0.weight"].shape == (2, 3, 2)
    torch.testing.assert_close(space.flatten(pieces), batch)
    sub = space.subspace(["1.bias", "0.bias"])
    assert sub.names == ("0.bias", "1.bias") and sub.numel == 4
    with pytest.raises(ValueError, match="last dimension of 13"):
        space.unflatten(torch.zeros(12))


def test_compiled_submodules_keep_their_names_in_blocks_and_patterns():
    model = torch.nn.Sequential()
    model.add_module("enc", torch.compile(torch.nn.Linear(3, 4)))  # registered as enc._orig_mod
    model.add_module("head", torch.nn.Linear(4, 2))
    names = list(lh.select_parameters(model))
    assert names == ["enc._orig_mod.weight", "enc._orig_mod.bias", "head.weight", "head.bias"]
    assert list(lh.resolve_blocks(names, "module")) == ["enc", "head"]
    assert list(lh.resolve_blocks(names, "parameter")) == [
        "enc.weight",
        "enc.bias",
        "head.weight",
        "head.bias",
    ]
    assert list(lh.select_parameters(model, "enc.*")) == ["enc._orig_mod.weight", "enc._orig_mod.bias"]
    assert lh.resolve_blocks(names, {"encoder": "enc.weight"}) == {"encoder": ("enc._orig_mod.weight",)}


def test_a_model_that_is_not_a_module_gets_a_clear_type_error():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got function"):
        lh.select_parameters(lambda x: x)
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got dict"):
        lh.HessianOperator({"w": torch.zeros(2)}, lambda m, b: b.sum(), [torch.zeros(2)])
