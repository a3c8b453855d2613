import copy

import pytest
import timm
import torch
from torch import nn

from adclr.queries import forward_with_queries
from adclr.train.heads import DINOHead, cancel_last_layer_gradients
from adclr.train.network import SSLNetwork

IN, HID, BOT, OUT = 48, 32, 16, 64


def _head(**kw) -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(IN, out_dim=OUT, hidden_dim=HID, bottleneck_dim=BOT, **kw)


@pytest.mark.parametrize("shape", [(5, IN), (5, 3, IN), (5, 0, IN), (2, 3, 4, IN)])
def test_output_shape_any_leading_dims(shape):
    head = _head()
    assert head(torch.randn(shape)).shape == (*shape[:-1], OUT)


def test_tokens_match_rowwise_call_with_batchnorm():
    head = _head(use_bn=True).eval()
    x = torch.randn(4, 3, IN)
    torch.testing.assert_close(head(x), head(x.reshape(12, IN)).reshape(4, 3, OUT))


def test_last_layer_input_is_l2_normalised_and_logits_are_cosines():
    head = _head()
    seen = {}
    head.last_layer.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0]))
    out = head(torch.randn(6, 2, IN) * 10)
    z = seen["z"]
    assert z.shape == (12, BOT)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(12))
    # g == 1, so the effective weight rows are unit vectors and logits are cosine similarities in [-1, 1].
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(OUT))
    torch.testing.assert_close(out.reshape(12, OUT), z @ w.T)
    assert out.abs().max() <= 1 + 1e-6


def test_weight_norm_parametrization_and_frozen_g():
    head = _head()
    assert torch.nn.utils.parametrize.is_parametrized(head.last_layer, "weight")
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert g.shape == (OUT, 1) and v.shape == (OUT, BOT)
    assert torch.equal(g, torch.ones(OUT, 1))
    assert not g.requires_grad and v.requires_grad
    assert head.last_layer.bias is None
    assert _head(norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_trainable_parameter_count_equals_hand_count():
    mlp = (IN * HID + HID) + (HID * HID + HID) + (HID * BOT + BOT)
    last_v = BOT * OUT
    assert count(_head()) == mlp + last_v
    assert count(_head(norm_last_layer=False)) == mlp + last_v + OUT
    bn = 2 * HID * 2  # weight + bias of the two hidden BatchNorms
    assert count(_head(use_bn=True)) == mlp + last_v + bn
    assert count(_head(nlayers=1)) == IN * BOT + BOT + last_v


def test_linear_init_is_trunc_normal_small():
    head = _head()
    first = head.mlp[0]
    assert isinstance(first, nn.Linear)
    assert torch.equal(first.bias, torch.zeros(HID))
    assert abs(first.weight.std().item() - 0.02) < 0.003
    assert first.weight.abs().max() < 0.2


def test_cancel_last_layer_gradients_through_a_wrapper():
    wrapper = nn.Sequential(nn.Identity(), _head(norm_last_layer=False))
    wrapper(torch.randn(4, IN)).sum().backward()
    head = wrapper[1]
    assert all(p.grad is not None for p in head.last_layer.parameters())
    cancel_last_layer_gradients(wrapper)
    assert all(p.grad is None for p in head.last_layer.parameters())
    assert all(p.grad is not None for p in head.mlp.parameters())


def test_deepcopy_gives_identical_teacher_with_parametrization():
    head = _head()
    teacher = copy.deepcopy(head)
    x = torch.randn(3, IN)
    assert torch.equal(head(x), teacher(x))
    assert list(teacher.state_dict()) == list(head.state_dict())
    assert "last_layer.parametrizations.weight.original0" in head.state_dict()


def test_bad_nlayers_is_rejected():
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(IN, nlayers=0)


def test_network_computes_the_last_layer_weight_once_per_forward_with_unchanged_outputs_and_gradients():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=IN, num_heads=3, depth=1,
                            num_classes=0, dynamic_img_size=True)
    net = SSLNetwork(vit, _head())
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    local = torch.randn(2, 3, 16, 16)
    queries = torch.randn(2, 3, 3, 8, 8)
    weight_norms = []
    net.head.last_layer.parametrizations.weight[0].register_forward_hook(lambda *_: weight_norms.append(1))
    out = net(views, queries, [local], local_queries=True)
    assert len(weight_norms) == 1  # shared by the global [CLS], query, local [CLS] and local query rows

    # Reference: each head use on its own (outside the network's forward, so each computes its own weight).
    tokens, query_tokens = forward_with_queries(vit, torch.cat(views), queries.repeat(2, 1, 1, 1, 1))
    local_tokens, local_query_tokens = forward_with_queries(vit, local, queries)
    expected = {"cls": [net.head(vit.forward_head(tokens, pre_logits=True)),
                        net.head(vit.forward_head(local_tokens, pre_logits=True))],
                "query": [net.head(query_tokens), net.head(local_query_tokens)]}
    assert len(weight_norms) == 5
    got = {"cls": torch.cat(out["cls"]), "query": torch.cat(out["query"])}
    expected = {name: torch.cat(parts) for name, parts in expected.items()}
    gradients = []
    for outputs in (got, expected):
        torch.manual_seed(1)
        sum((torch.randn_like(o) * o).sum() for o in outputs.values()).backward()
        gradients.append({n: p.grad.clone() for n, p in net.head.named_parameters() if p.grad is not None})
        net.zero_grad(set_to_none=True)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 2
    for name, grad in gradients[0].items():
        # one matmul over all rows sums the weight gradient in another order: fp32 rounding of the largest entry
        torch.testing.assert_close(grad, gradients[1][name], atol=1e-6 * grad.abs().max().item(), rtol=1e-5)
