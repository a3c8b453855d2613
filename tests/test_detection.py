"""adclr.detection: ViTDet pyramid, torchvision detectors, layer-wise lr decay, key converter, shims, seg head."""
import collections
import copy
import importlib
import math
import sys
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from adclr.detection import (SegmentationHead, SimpleFeaturePyramid, detectron2_to_timm, faster_rcnn, mask_rcnn,
                             param_groups_lrd, timm_to_detectron2)

C = 32  # pyramid channels in every test


def tiny_vit(depth: int = 4, seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    args = dict(img_size=64, patch_size=16, embed_dim=48, depth=depth, num_heads=3, num_classes=0,
                dynamic_img_size=True)
    return VisionTransformer(**(args | kw))


def expected_shapes(h: int, w: int) -> dict[str, tuple[int, int]]:
    """Patch-16 ViT, scales 4/2/1/0.5 + pool: pad to 16, then x4, x2, x1, floor /2, ceil /2."""
    gh, gw = math.ceil(h / 16), math.ceil(w / 16)
    return {'0': (4 * gh, 4 * gw), '1': (2 * gh, 2 * gw), '2': (gh, gw), '3': (gh // 2, gw // 2),
            'pool': (math.ceil((gh // 2) / 2), math.ceil((gw // 2) / 2))}


# ---------------------------------------------------------------- pyramid


@pytest.mark.parametrize('size', [(128, 160), (100, 150), (64, 64)])
def test_pyramid_shapes_for_any_input_size(size):
    pyramid = SimpleFeaturePyramid(tiny_vit(), out_channels=C)
    out = pyramid(torch.randn(2, 3, *size))
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == expected_shapes(*size)
    assert all(v.shape[:2] == (2, C) for v in out.values())
    assert pyramid.out_channels == C
    assert dict(pyramid.strides) == {'0': 4, '1': 8, '2': 16, '3': 32, 'pool': 64}


def test_input_is_zero_padded_right_and_bottom():
    pyramid = SimpleFeaturePyramid(tiny_vit(), out_channels=C).eval()
    x = torch.randn(1, 3, 100, 150)
    canvas = torch.zeros(1, 3, 112, 160)
    canvas[..., :100, :150] = x
    with torch.no_grad():
        a, b = pyramid(x), pyramid(canvas)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def _layer_norm_channels(x, norm):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)


def test_levels_match_a_plain_vitdet_reference():
    vit = tiny_vit()
    pyramid = SimpleFeaturePyramid(vit, out_channels=C).eval()
    x = torch.randn(1, 3, 64, 64)  # 4x4 grid = the pos-embed grid, so no resampling in the reference
    with torch.no_grad():
        out = pyramid(x)
        tokens = F.conv2d(x, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=16)
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token, tokens], dim=1) + vit.pos_embed
        for block in vit.blocks:
            tokens = block(tokens)
        fmap = tokens[:, 1:].transpose(1, 2).reshape(1, 48, 4, 4)  # last block, no final norm

        def neck(m, stage):
            m = _layer_norm_channels(F.conv2d(m, stage[1].weight), stage[2])
            return _layer_norm_channels(F.conv2d(m, stage[3].weight, padding=1), stage[4])

        deconv = pyramid.stages[1][0][0]
        up2 = F.conv_transpose2d(fmap, deconv.weight, deconv.bias, stride=2)
        torch.testing.assert_close(out['2'], neck(fmap, pyramid.stages[2]))
        torch.testing.assert_close(out['1'], neck(up2, pyramid.stages[1]))
        torch.testing.assert_close(out['3'], neck(F.max_pool2d(fmap, 2), pyramid.stages[3]))
        torch.testing.assert_close(out['pool'], out['3'][..., ::2, ::2])


def test_fixed_size_vit_is_made_dynamic_and_trimmed():
    vit = tiny_vit(dynamic_img_size=False)
    pyramid = SimpleFeaturePyramid(vit, out_channels=C, layer_indices=[1])
    assert vit.dynamic_img_size and len(vit.blocks) == 2 and isinstance(vit.norm, nn.Identity)
    out = pyramid(torch.randn(1, 3, 96, 128))
    assert tuple(out['2'].shape) == (1, C, 6, 8)


def test_registry_name_builds_a_dynamic_vit():
    pyramid = SimpleFeaturePyramid('vit_tiny_patch16_224', out_channels=C)
    assert isinstance(pyramid.backbone, VisionTransformer) and pyramid.backbone.dynamic_img_size
    out = pyramid(torch.randn(1, 3, 64, 96))
    assert tuple(out['0'].shape) == (1, C, 16, 24)


def test_multi_layer_variant_reads_one_block_per_scale():
    assert SimpleFeaturePyramid(tiny_vit(depth=12), out_channels=C, multi_layer=True).layer_indices == [2, 5, 8, 11]
    vit = tiny_vit()
    full = copy.deepcopy(vit)
    pyramid = SimpleFeaturePyramid(vit, out_channels=C, multi_layer=True).eval()
    assert pyramid.layer_indices == [0, 1, 2, 3]
    x = torch.randn(1, 3, 100, 150)
    with torch.no_grad():
        out = pyramid(x)
        blocks = full.forward_intermediates(F.pad(x, (0, 10, 0, 12)), indices=[0, 1, 2, 3], intermediates_only=True)
        for level, fmap in zip('0123', blocks):
            torch.testing.assert_close(out[level], pyramid.stages[int(level)](fmap))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == expected_shapes(100, 150)


def test_bad_arguments_name_the_problem():
    with pytest.raises(TypeError, match='VisionTransformer'):
        SimpleFeaturePyramid(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="'LN'"):
        SimpleFeaturePyramid(tiny_vit(), norm='BN')
    with pytest.raises(ValueError, match='power of two'):
        SimpleFeaturePyramid(tiny_vit(), scale_factors=(3.0, 1.0))
    with pytest.raises(ValueError, match='decrease'):
        SimpleFeaturePyramid(tiny_vit(), scale_factors=(1.0, 2.0))
    with pytest.raises(ValueError, match='must name 4 block'):
        SimpleFeaturePyramid(tiny_vit(), multi_layer=True, layer_indices=[1, 2])
    with pytest.raises(ValueError, match='increase'):
        SimpleFeaturePyramid(tiny_vit(), multi_layer=True, layer_indices=[3, 2, 1, 0])
    with pytest.raises(ValueError, match='patch_drop_rate=0'):
        SimpleFeaturePyramid(tiny_vit(patch_drop_rate=0.5))
    with pytest.raises(ValueError, match='freeze_blocks=5'):
        SimpleFeaturePyramid(tiny_vit(), freeze_blocks=5)


# ---------------------------------------------------------------- freezing and checkpointing


def test_frozen_backbone_does_not_move_while_the_neck_does():
    pyramid = SimpleFeaturePyramid(tiny_vit(drop_path_rate=0.1), out_channels=C, freeze_backbone=True)
    assert not any(p.requires_grad for p in pyramid.backbone.parameters())
    pyramid.train()
    assert not pyramid.backbone.training and pyramid.stages.training
    before = copy.deepcopy(pyramid.state_dict())
    opt = torch.optim.AdamW(pyramid.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(2, 3, 64, 80)
    for _ in range(3):
        loss = sum(v.square().mean() for v in pyramid(x).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = pyramid.state_dict()
    for k, v in before.items():
        if k.startswith('backbone.'):
            assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith('stages.'))


def test_freeze_blocks_freezes_exactly_stem_and_first_blocks():
    pyramid = SimpleFeaturePyramid(tiny_vit(), out_channels=C, freeze_blocks=2)
    names = [n for n, _ in pyramid.backbone.named_parameters()]
    stem = {'cls_token', 'pos_embed'} | {n for n in names if n.startswith('patch_embed.')}
    expected = stem | {n for n in names if n.startswith(('blocks.0.', 'blocks.1.'))}
    frozen = {n for n, p in pyramid.backbone.named_parameters() if not p.requires_grad}
    assert frozen == expected
    assert all(p.requires_grad for n, p in pyramid.named_parameters() if n.startswith('stages.'))
    sum(v.mean() for v in pyramid(torch.randn(1, 3, 64, 64)).values()).backward()
    for n, p in pyramid.backbone.named_parameters():
        assert (p.grad is None) == (n in expected), n


def test_grad_checkpointing_gives_same_outputs_and_grads():
    vit = tiny_vit()
    vit_ckpt = copy.deepcopy(vit)
    torch.manual_seed(1)
    plain = SimpleFeaturePyramid(vit, out_channels=C)
    torch.manual_seed(1)
    ckpt = SimpleFeaturePyramid(vit_ckpt, out_channels=C, grad_checkpointing=True)
    calls = []
    ckpt.backbone.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 80, 96)
    out_a, out_b = plain(x), ckpt(x)
    sum(v.square().mean() for v in out_a.values()).backward()
    sum(v.square().mean() for v in out_b.values()).backward()
    assert len(calls) == 2  # the block ran again during backward: checkpointing is really on
    for k in out_a:
        torch.testing.assert_close(out_a[k], out_b[k])
    for (name, pa), (_, pb) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- layer-wise lr decay


def test_param_groups_lrd_on_a_bare_vit():
    vit = tiny_vit()
    groups = param_groups_lrd(vit, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    where = {id(p): g for g in groups for p in g['params']}
    assert sum(len(g['params']) for g in groups) == len(where) == len(list(vit.parameters()))
    for name, p in vit.named_parameters():
        if name.startswith(('patch_embed.', 'cls_token', 'pos_embed')):
            scale = 0.5 ** 5
        elif name.startswith('blocks.'):
            scale = 0.5 ** (4 - int(name.split('.')[1]))
        else:
            scale = 1.0
        no_decay = p.ndim == 1 or name in ('cls_token', 'pos_embed')
        g = where[id(p)]
        assert g['lr'] == pytest.approx(scale) and g['lr_scale'] == pytest.approx(scale), name
        assert g['weight_decay'] == (0.0 if no_decay else 0.05), name


def test_param_groups_lrd_on_a_detector_skips_frozen_parameters():
    model = mask_rcnn(tiny_vit(), num_classes=3, out_channels=C, freeze_blocks=1)
    groups = param_groups_lrd(model, lr=2.0, weight_decay=0.1, layer_decay=0.75)
    seen = [id(p) for g in groups for p in g['params']]
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)) and set(seen) == set(trainable)
    scale = {trainable[id(p)]: g['lr'] / 2.0 for g in groups for p in g['params']}
    assert scale['backbone.backbone.blocks.1.attn.qkv.weight'] == pytest.approx(0.75 ** 3)
    assert scale['backbone.backbone.blocks.3.mlp.fc2.bias'] == pytest.approx(0.75)
    assert scale['backbone.stages.0.1.weight'] == 1.0
    assert scale['roi_heads.box_predictor.cls_score.weight'] == 1.0
    assert 'backbone.backbone.pos_embed' not in scale
    with pytest.raises(ValueError, match='exactly one'):
        param_groups_lrd(nn.ModuleList([tiny_vit(), tiny_vit()]), lr=1.0, weight_decay=0.0)


# ---------------------------------------------------------------- torchvision detectors


def scene(g: torch.Generator, h: int = 128, w: int = 160):
    """A rectangle (class 1) and an ellipse (class 2) on noise, with boxes and masks."""
    img = torch.rand(3, h, w, generator=g) * 0.2
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    y0 = int(torch.randint(0, h - 48, (1,), generator=g))
    x0 = int(torch.randint(0, w - 48, (1,), generator=g))
    rect = torch.zeros(h, w, dtype=torch.uint8)
    rect[y0:y0 + 40, x0:x0 + 36] = 1
    cy = int(torch.randint(30, h - 30, (1,), generator=g))
    cx = int(torch.randint(30, w - 30, (1,), generator=g))
    ellipse = (((yy - cy) / 22.0) ** 2 + ((xx - cx) / 28.0) ** 2 <= 1).to(torch.uint8)
    img[:, rect.bool()] = torch.tensor([0.9, 0.2, 0.2])[:, None]
    img[:, ellipse.bool()] = torch.tensor([0.2, 0.3, 0.9])[:, None]
    masks = torch.stack([rect * (1 - ellipse), ellipse])
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return img, {'boxes': torch.tensor(boxes, dtype=torch.float32), 'labels': torch.tensor([1, 2]), 'masks': masks}


def test_mask_rcnn_trains_and_predicts_valid_boxes_and_masks():
    g = torch.Generator().manual_seed(0)
    images, targets = zip(*[scene(g) for _ in range(2)])
    torch.manual_seed(0)
    model = mask_rcnn(
        tiny_vit(), num_classes=None, out_channels=C, min_size=128, max_size=160,
        rpn_batch_size_per_image=64, box_batch_size_per_image=64,
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
        box_head=TwoMLPHead(C * 49, 128), box_predictor=FastRCNNPredictor(128, 3),
        mask_head=MaskRCNNHeads(C, (C, C), 1), mask_predictor=MaskRCNNPredictor(C, C, 3))
    opt = torch.optim.AdamW(param_groups_lrd(model, lr=1e-3, weight_decay=0.05))
    model.train()
    losses = []
    for _ in range(25):
        loss_dict = model(list(images), list(targets))
        assert {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness'} <= set(loss_dict)
        loss = sum(loss_dict.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5]), losses

    model.eval()
    with torch.no_grad():
        predictions = model(list(images))
    for p in predictions:
        n = len(p['boxes'])
        assert p['boxes'].shape == (n, 4) and p['labels'].shape == p['scores'].shape == (n,)
        assert p['masks'].shape == (n, 1, 128, 160)
        b = p['boxes']
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 160).all() and (b[:, 3] <= 128).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert set(p['labels'].tolist()) <= {1, 2}
        assert ((p['scores'] >= 0) & (p['scores'] <= 1)).all() and ((p['masks'] >= 0) & (p['masks'] <= 1)).all()


def test_torchvision_faster_rcnn_takes_the_pyramid_unchanged():
    model = FasterRCNN(SimpleFeaturePyramid(tiny_vit(), out_channels=C), num_classes=3, min_size=96, max_size=128,
                       rpn_post_nms_top_n_test=50).eval()
    with torch.no_grad():
        (pred,) = model([torch.rand(3, 96, 128)])
    assert set(pred) == {'boxes', 'labels', 'scores'} and pred['boxes'].shape[1:] == (4,)


def test_builders_match_anchors_and_roi_pooling_to_the_levels():
    model = faster_rcnn(tiny_vit(), num_classes=5, out_channels=C, freeze_blocks=2)
    anchors = model.rpn.anchor_generator
    assert anchors.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert anchors.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert model.roi_heads.box_roi_pool.featmap_names == ['0', '1', '2', '3']
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    assert model.transform.image_mean == list(timm.data.IMAGENET_DEFAULT_MEAN)
    assert not model.backbone.backbone.blocks[1].attn.qkv.weight.requires_grad  # pyramid kwargs reach the pyramid
    assert model.backbone.backbone.blocks[2].attn.qkv.weight.requires_grad
    assert model.roi_heads.box_predictor.cls_score.out_features == 5

    model = mask_rcnn(tiny_vit(), num_classes=2, out_channels=C, top_block=False, min_size=(480, 512), max_size=900)
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,))
    assert model.roi_heads.mask_roi_pool.featmap_names == ['0', '1', '2', '3']
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert model.transform.min_size == (480, 512) and model.transform.max_size == 900

    vit = timm.create_model('vit_tiny_patch16_224', num_classes=0, depth=2)  # normalise like its pretraining
    assert faster_rcnn(vit, num_classes=2, out_channels=C).transform.image_mean == list(vit.pretrained_cfg['mean'])
    with pytest.raises(ValueError, match='freeze_blocks'):
        faster_rcnn(SimpleFeaturePyramid(tiny_vit(), out_channels=C), num_classes=2, freeze_blocks=1)


# ---------------------------------------------------------------- detectron2 keys


def test_timm_to_detectron2_round_trip():
    sd = tiny_vit().state_dict()
    d2 = timm_to_detectron2(sd)
    assert set(d2) == {'backbone.net.' + k for k in sd if k not in ('cls_token', 'norm.weight', 'norm.bias')}
    assert {'backbone.net.blocks.0.attn.qkv.weight', 'backbone.net.pos_embed',
            'backbone.net.patch_embed.proj.weight'} <= set(d2)
    back = detectron2_to_timm(d2)
    assert set(back) == set(sd) - {'cls_token', 'norm.weight', 'norm.bias'}
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    missing, unexpected = tiny_vit(seed=1).load_state_dict(back, strict=False)
    assert sorted(missing) == ['cls_token', 'norm.bias', 'norm.weight'] and not unexpected


def test_detectron2_pos_embed_without_and_with_cls_position():
    torch.manual_seed(0)
    grid_only = torch.randn(1, 16, 48)  # pretrain_use_cls_token=False
    d2 = {'backbone.net.pos_embed': grid_only,
          'backbone.net.blocks.0.mlp.fc1.weight': torch.randn(8, 48),
          'backbone.simfp_2.0.weight': torch.randn(48, 24, 2, 2),
          'roi_heads.box_predictor.bbox_pred.bias': torch.zeros(4)}
    timm_sd = detectron2_to_timm(d2, cls_position=True)
    assert set(timm_sd) == {'pos_embed', 'blocks.0.mlp.fc1.weight'}  # neck and heads are not the ViT's
    assert timm_sd['pos_embed'].shape == (1, 17, 48)
    assert torch.equal(timm_sd['pos_embed'][:, 0], torch.zeros(1, 48))
    assert torch.equal(timm_sd['pos_embed'][:, 1:], grid_only)
    back = timm_to_detectron2(timm_sd, cls_position=False)
    assert set(back) == {'backbone.net.pos_embed', 'backbone.net.blocks.0.mlp.fc1.weight'}
    assert torch.equal(back['backbone.net.pos_embed'], grid_only)

    with_cls = torch.randn(1, 17, 48)  # pretrain_use_cls_token=True into a timm ViT without a [CLS] position
    timm_sd = detectron2_to_timm({'backbone.net.pos_embed': with_cls}, cls_position=False)
    assert torch.equal(timm_sd['pos_embed'], with_cls[:, 1:])
    no_cls_vit = tiny_vit(class_token=False, global_pool='avg')
    no_cls_vit.load_state_dict(timm_sd, strict=False)
    assert torch.equal(no_cls_vit.pos_embed.data, with_cls[:, 1:])

    with pytest.raises(ValueError, match='square grid'):
        detectron2_to_timm({'backbone.net.pos_embed': torch.zeros(1, 15, 48)})


def test_detectron2_keys_without_timm_counterpart():
    d2 = {'backbone.net.blocks.0.attn.rel_pos_h': torch.zeros(27, 16),  # ViTDet relative positions
          'backbone.net.blocks.0.norm1.weight': torch.ones(48)}
    with pytest.raises(ValueError, match='strict=False'):
        detectron2_to_timm(d2)
    assert set(detectron2_to_timm(d2, strict=False)) == {'blocks.0.norm1.weight'}
    with pytest.raises(ValueError, match='ls1.gamma'):
        timm_to_detectron2(tiny_vit(init_values=1e-5).state_dict())


# ---------------------------------------------------------------- shims

SHIMS = {'adclr.detection.detectron2_backbone': ('detectron2', 'detectron2.layers', 'detectron2.modeling'),
         'adclr.detection.mmdet_backbone': ('mmdet', 'mmdet.registry', 'mmengine', 'mmengine.model')}


def _forget(module: str) -> None:
    sys.modules.pop(module, None)
    parent = sys.modules['adclr.detection']
    if hasattr(parent, module.rpartition('.')[2]):
        delattr(parent, module.rpartition('.')[2])


@pytest.mark.parametrize('module', sorted(SHIMS))
def test_shims_raise_a_clear_import_error_without_their_framework(module, monkeypatch):
    for name in SHIMS[module]:
        monkeypatch.setitem(sys.modules, name, None)  # import of `name` now fails as if not installed
    _forget(module)
    try:
        with pytest.raises(ImportError, match='pip install') as err:
            importlib.import_module(module)
        assert module in str(err.value)
    finally:
        _forget(module)


def test_detectron2_shim_against_a_stand_in_api(monkeypatch):
    """detectron2 cannot be installed here: a stand-in with its Backbone/ShapeSpec signatures checks our wiring."""
    layers, modeling = types.ModuleType('detectron2.layers'), types.ModuleType('detectron2.modeling')
    layers.ShapeSpec = collections.namedtuple('ShapeSpec', 'channels height width stride', defaults=(None,) * 4)
    modeling.Backbone = type('Backbone', (nn.Module,), {})
    for name, mod in (('detectron2', types.ModuleType('detectron2')), ('detectron2.layers', layers),
                      ('detectron2.modeling', modeling)):
        monkeypatch.setitem(sys.modules, name, mod)
    _forget('adclr.detection.detectron2_backbone')
    try:
        shim = importlib.import_module('adclr.detection.detectron2_backbone')
        backbone = shim.ADCLRViTDetBackbone(tiny_vit(), out_channels=C)
        assert isinstance(backbone, modeling.Backbone)
        out = backbone(torch.randn(1, 3, 128, 192))
        shapes = backbone.output_shape()
        assert list(out) == list(shapes) == ['p2', 'p3', 'p4', 'p5', 'p6']
        for name, fmap in out.items():
            assert shapes[name].channels == fmap.shape[1] == C
            assert shapes[name].stride == 2 ** int(name[1:]) == 128 // fmap.shape[-2]
        assert backbone.size_divisibility == 32
    finally:
        _forget('adclr.detection.detectron2_backbone')


def test_mmdet_shim_registers_a_backbone():
    registry = pytest.importorskip('mmdet.registry', reason='mmdet 3.x not installed')
    shim = importlib.import_module('adclr.detection.mmdet_backbone')
    # module_dict, not MODELS.get/build: those first import mmdet.models, which needs mmcv's compiled ops
    assert registry.MODELS.module_dict['ADCLRSimpleFeaturePyramid'] is shim.ADCLRSimpleFeaturePyramid
    backbone = shim.ADCLRSimpleFeaturePyramid(backbone=tiny_vit(), out_channels=C)
    feats = backbone(torch.randn(1, 3, 100, 150))
    assert [tuple(f.shape[-2:]) for f in feats] == list(expected_shapes(100, 150).values())


# ---------------------------------------------------------------- segmentation


def test_segmentation_head_shape_crop_and_training():
    torch.manual_seed(0)
    head = SegmentationHead(SimpleFeaturePyramid(tiny_vit(), out_channels=C, top_block=False), num_classes=3)
    g = torch.Generator().manual_seed(1)
    images, targets = zip(*[scene(g, 100, 120) for _ in range(2)])
    x = torch.stack(images)
    labels = torch.stack([t['masks'][0].long() + 2 * t['masks'][1].long() for t in targets])
    assert head(x).shape == (2, 3, 100, 120)

    head.eval()
    with torch.no_grad():  # padding is cropped off exactly where the pyramid put it
        torch.testing.assert_close(head(x), head(F.pad(x, (0, 8, 0, 12)))[..., :100, :120])
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(head(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    with pytest.raises(TypeError, match='SimpleFeaturePyramid'):
        SegmentationHead(tiny_vit(), num_classes=3)
