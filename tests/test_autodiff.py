"""core.autodiff.grad_and_value: torch.func's contract, torch.autograd's mechanism in plain eager."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from functional_seg.core import random as jr
from functional_seg.core.autodiff import active_transforms, grad_and_value
from functional_seg.core.tree import tree_allclose, tree_map
from functional_seg.models import create_model


def _segnet_loss():
    model = create_model("segnet", widths=(4, 8), convs_per_stage=(1, 1))
    params, state = model.init(jr.key(0))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4, 16, 16), generator=g)

    def loss(p):
        logits, new_state = model.apply(p, state, x, train=True)
        return F.cross_entropy(logits, y), new_state

    return params, loss


def test_plain_eager_equals_torch_func_on_a_model_with_batch_norm_state():
    params, loss = _segnet_loss()
    grads, (value, new_state) = grad_and_value(loss)(params)
    ref_grads, (ref_value, ref_state) = torch.func.grad_and_value(loss, has_aux=True)(params)
    assert torch.equal(value, ref_value)
    assert tree_allclose(grads, ref_grads, rtol=1e-6, atol=1e-7)
    assert tree_allclose(new_state, ref_state, rtol=0, atol=0)
    assert not value.requires_grad and all(not t.requires_grad for t in torch.utils._pytree.tree_leaves(new_state))
    assert all(not t.requires_grad for t in torch.utils._pytree.tree_leaves(params))  # inputs untouched


def test_an_unused_leaf_gets_zeros_as_torch_func_gives():
    params = {"used": torch.tensor([1.0, 2.0]), "unused": torch.ones(3)}
    grads, (value, aux) = grad_and_value(lambda p: ((p["used"] ** 2).sum(), None))(params)
    assert torch.equal(grads["used"], torch.tensor([2.0, 4.0])) and torch.equal(grads["unused"], torch.zeros(3))
    assert value.item() == 5.0 and aux is None


def test_a_non_scalar_value_is_refused():
    with pytest.raises(ValueError, match="scalar"):
        grad_and_value(lambda p: (p * 2, None))(torch.ones(3))


def test_under_vmap_and_compile_it_is_torch_func():
    params, loss = _segnet_loss()
    stacked = tree_map(lambda t: torch.stack([t, 2 * t]), params)
    seen = []

    def probe(p):
        seen.append(active_transforms())
        return loss(p)

    vgrads, _ = torch.func.vmap(grad_and_value(probe))(stacked)
    ref, _ = torch.func.vmap(torch.func.grad_and_value(loss, has_aux=True))(stacked)
    assert "Vmap" in seen[-1] and "Grad" in seen[-1]
    assert tree_allclose(vgrads, ref, rtol=1e-5, atol=1e-6)
    compiled = torch.compile(grad_and_value(loss), backend="aot_eager", fullgraph=True)
    cgrads, _ = compiled(params)
    assert tree_allclose(cgrads, grad_and_value(loss)(params)[0], rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(-3, 3), min_size=1, max_size=4), min_size=1, max_size=4),
       st.floats(0.1, 2.0))
def test_gradient_of_a_weighted_square_is_its_analytic_value(rows, scale):
    """For f(p) = scale * sum_i sum(p_i ** 2): df/dp_i = 2 * scale * p_i, leaf by leaf."""
    params = {f"leaf{i}": torch.tensor(r, dtype=torch.float64) for i, r in enumerate(rows)}
    f = lambda p: (scale * sum((t ** 2).sum() for t in p.values()), None)
    grads, (value, _) = grad_and_value(f)(params)
    for name, t in params.items():
        torch.testing.assert_close(grads[name], 2 * scale * t)
    torch.testing.assert_close(value, torch.tensor(scale * sum(x * x for r in rows for x in r), dtype=torch.float64))
