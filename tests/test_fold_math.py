"""Each folding rule alone, in float64 on random weights, against torch's own convolutions."""

import pytest
import torch
import torch.nn.functional as F

from hf_layerfold.fold_math import (
    add_shortcut_tap,
    compose_convs,
    composed_groups,
    dilate_kernel,
    fuse_bn,
    grouped_to_dense,
    merged_kernel_size,
)

D = torch.float64


def test_fuse_bn_matches_batchnorm():
    torch.manual_seed(0)
    w, b, x = torch.randn(6, 4, 3, 3, dtype=D), torch.randn(6, dtype=D), torch.randn(2, 4, 9, 9, dtype=D)
    mean, var, gamma, beta = torch.randn(6, dtype=D), torch.rand(6, dtype=D) + 0.1, torch.randn(6, dtype=D), \
        torch.randn(6, dtype=D)
    ref = F.batch_norm(F.conv2d(x, w, b, padding=1), mean, var, gamma, beta, False, 0.0, 1e-5)
    wf, bf = fuse_bn(w, b, mean, var, 1e-5, gamma, beta)
    assert torch.allclose(F.conv2d(x, wf, bf, padding=1), ref, atol=1e-12)
    wf, bf = fuse_bn(w, None, mean, var, 1e-5, None, None)  # no conv bias, no affine
    ref = F.batch_norm(F.conv2d(x, w, padding=1), mean, var, None, None, False, 0.0, 1e-5)
    assert torch.allclose(F.conv2d(x, wf, bf, padding=1), ref, atol=1e-12)


def test_dilate_kernel_matches_dilated_conv():
    w, x = torch.randn(3, 2, 3, 3, dtype=D), torch.randn(1, 2, 12, 12, dtype=D)
    wd = dilate_kernel(w, (2, 3))
    assert wd.shape[-2:] == (5, 7)
    assert torch.allclose(F.conv2d(x, wd), F.conv2d(x, w, dilation=(2, 3)), atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_to_dense(groups):
    w, x = torch.randn(8, 4 // groups, 3, 3, dtype=D), torch.randn(1, 4, 7, 7, dtype=D)
    assert torch.allclose(F.conv2d(x, grouped_to_dense(w, groups)), F.conv2d(x, w, groups=groups), atol=1e-12)


CASES = [  # (c0, c1, c2, k1, s1, g1, k2, s2, g2)
    (4, 6, 5, 1, 1, 1, 3, 1, 1),  # 1x1 then 3x3
    (4, 6, 5, 3, 2, 1, 3, 1, 1),  # stride-2 3x3 then 3x3 → 7x7 stride 2
    (6, 6, 6, 3, 1, 6, 1, 1, 1),  # depthwise then pointwise
    (4, 6, 6, 1, 1, 1, 3, 2, 6),  # pointwise then stride-2 depthwise
    (6, 6, 6, 3, 1, 6, 5, 1, 6),  # depthwise then depthwise stays depthwise
    (4, 8, 6, 3, 1, 2, 3, 1, 2),  # same grouping keeps groups
    (4, 8, 6, 3, 2, 2, 1, 1, 1),  # grouped then dense
    (6, 6, 4, 3, 1, 6, 3, 1, 2),  # depthwise then grouped
    (4, 6, 5, 2, 2, 1, 3, 1, 1),  # even kernel, stride 2
]


@pytest.mark.parametrize("c0,c1,c2,k1,s1,g1,k2,s2,g2", CASES)
def test_compose_convs_equals_sequence(c0, c1, c2, k1, s1, g1, k2, s2, g2):
    torch.manual_seed(1)
    w1, b1 = torch.randn(c1, c0 // g1, k1, k1, dtype=D), torch.randn(c1, dtype=D)
    w2, b2 = torch.randn(c2, c1 // g2, k2, k2, dtype=D), torch.randn(c2, dtype=D)
    x = torch.randn(2, c0, 17, 15, dtype=D)
    ref = F.conv2d(F.conv2d(x, w1, b1, stride=s1, groups=g1), w2, b2, stride=s2, groups=g2)
    w, b, g = compose_convs(w1, b1, (s1, s1), g1, w2, b2, g2)
    assert w.shape[-2:] == merged_kernel_size((k1, k1), (s1, s1), (k2, k2))
    out = F.conv2d(x, w, b, stride=s1 * s2, groups=g)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-10)
    if g1 == g2:
        assert g == g1
    assert g == composed_groups(c1, c0 // g1, g1, c2, c1 // g2, g2)  # what the planner assumes when costing merges


def test_identity_tap_absorbs_residual():
    w, b, x = torch.randn(5, 5, 5, 5, dtype=D), torch.randn(5, dtype=D), torch.randn(1, 5, 11, 11, dtype=D)
    wi, g = add_shortcut_tap(w, 1, None, (2, 2))
    assert g == 1
    assert torch.allclose(F.conv2d(x, wi, b, padding=2), F.conv2d(x, w, b, padding=2) + x, atol=1e-12)
    dw = torch.randn(5, 1, 3, 3, dtype=D)  # depthwise stays depthwise
    wi, g = add_shortcut_tap(dw, 5, None, (1, 1))
    assert g == 5 and wi.shape == dw.shape
    assert torch.allclose(F.conv2d(x, wi, groups=5, padding=1), F.conv2d(x, dw, groups=5, padding=1) + x)


def test_shortcut_tap_absorbs_strided_projection():
    w, sc, x = torch.randn(8, 4, 3, 3, dtype=D), torch.randn(8, 4, 1, 1, dtype=D), torch.randn(1, 4, 12, 12, dtype=D)
    wi, _ = add_shortcut_tap(w, 1, sc, (1, 1))
    ref = F.conv2d(x, w, stride=2, padding=1) + F.conv2d(x, sc, stride=2)
    assert torch.allclose(F.conv2d(x, wi, stride=2, padding=1), ref, atol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        add_shortcut_tap(w, 1, torch.randn(8, 4, 3, 3, dtype=D), (1, 1))


class _TruncatingInt(int):
    """An int whose ``//`` truncates toward zero, as ONNX's integer Div does in an exported model."""

    def __floordiv__(self, other):
        return _TruncatingInt(int(int(self) / int(other)))

    def __neg__(self):
        return _TruncatingInt(-int(self))

    def __add__(self, other):
        return _TruncatingInt(int(self) + int(other))

    __radd__ = __add__

    def __sub__(self, other):
        return _TruncatingInt(int(self) - int(other))

    def __rsub__(self, other):
        return _TruncatingInt(int(other) - int(self))

    def __mul__(self, other):
        return _TruncatingInt(int(self) * int(other))

    __rmul__ = __mul__


def test_same_padding_is_right_under_truncating_division():
    """A folded TF-'same' model exported to ONNX with dynamic sizes padded wrongly at sizes the strides do not
    divide (0.2-0.6 off in onnxruntime): ceil was written -(-h // s), which truncating division gets wrong."""
    from hf_layerfold.padding import PadRule

    rule = PadRule((3, 3), (2, 2), None)
    for h, w in [(64, 64), (65, 65), (66, 71), (1, 2), (97, 30)]:
        assert rule.pads(_TruncatingInt(h), _TruncatingInt(w)) == rule.pads(h, w)


def test_fold_math_names_inputs_it_cannot_fold_and_takes_missing_biases_and_int_strides():
    """Public functions given what a user has at hand (``conv.bias`` of None, an int stride) failed inside torch;
    a depthwise tap outside the kernel wrapped around into another tap (a wrong kernel, no error)."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(6, 4, 3, 3, dtype=D), torch.randn(5, 6, 1, 1, dtype=D)
    zeros = compose_convs(w1, torch.zeros(6, dtype=D), (2, 2), 1, w2, torch.zeros(5, dtype=D), 1)
    none = compose_convs(w1, None, 2, 1, w2, None, 1)
    assert all(torch.equal(a, b) for a, b in zip(zeros[:2], none[:2], strict=True)) and zeros[2] == none[2]
    with pytest.raises(ValueError, match="conv2 takes 4 input channels .*but conv1 gives 6"):
        compose_convs(w1, None, 1, 1, torch.randn(5, 4, 1, 1), None, 1)
    with pytest.raises(ValueError, match="groups=3 does not divide the kernel's 8 output channels"):
        grouped_to_dense(torch.randn(8, 2, 3, 3), 3)
    depthwise = torch.randn(6, 1, 3, 3)
    for offset in ((-1, -1), (3, 3)):
        with pytest.raises(ValueError, match=r"shortcut kernel 1x1 at .* does not fit a 3x3 kernel"):
            add_shortcut_tap(depthwise, 6, None, offset)
    with pytest.raises(ValueError, match="an identity shortcut needs as many input as output channels"):
        add_shortcut_tap(w1, 1, None, (1, 1))
