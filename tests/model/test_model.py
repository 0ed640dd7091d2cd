"""SohoModel / SohoForPretraining: config round trip, shapes and masks, freezing, persistence, presets."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soho import (
    CrossModalEncoder,
    GridEncoder,
    SohoConfig,
    SohoForPretraining,
    SohoModel,
    default_text_model_path,
    get_preset,
    soho_base,
    soho_small,
    soho_tiny,
)


def _batch(b: int = 2, h: int = 64, w: int = 48, t: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (b, t), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return {
        "pixel_values": torch.randn(b, 3, h, w, generator=g),
        "pixel_mask": torch.ones(b, h, w, dtype=torch.bool),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }


def test_config_round_trip_and_presets() -> None:
    for preset in (soho_tiny(), soho_small(), soho_base()):
        d = preset.to_dict()
        assert SohoConfig.from_dict(json.loads(json.dumps(d))) == preset
    assert get_preset("tiny") == soho_tiny()
    assert soho_tiny().encoder.total_stride == 16
    assert soho_small().encoder.total_stride == 64 and soho_base().encoder.total_stride == 64
    assert (soho_small().vd.num_codes, soho_small().hidden_size) == (2048, 384)
    assert (soho_base().vd.num_codes, soho_base().hidden_size, soho_base().transformer.num_layers) == (
        2048,
        768,
        12,
    )
    assert soho_small().transformer.name_or_path == default_text_model_path()
    with pytest.raises(ValueError, match="unknown SOHO preset"):
        get_preset("huge")
    bad = soho_tiny().to_dict()
    bad["vd"]["dim"] = 64
    with pytest.raises(ValueError, match="vd.dim=64"):
        SohoConfig.from_dict(bad)
    bad = soho_tiny().to_dict()
    bad["vd"]["codes"] = 3
    with pytest.raises(ValueError, match="unknown keys"):
        SohoConfig.from_dict(bad)


def test_forward_shapes_and_padding_mask_follow_the_image() -> None:
    torch.manual_seed(0)
    cfg = soho_tiny()
    model = SohoModel(cfg).eval()
    batch = _batch(b=2, h=64, w=48)
    batch["pixel_mask"][1, :, 32:] = False  # image 1 is 64×32, padded on the right to 48
    batch["pixel_mask"][1, 48:, :] = False  # and 48 tall
    out = model(**batch)
    s = cfg.encoder.total_stride
    h, w = 64 // s, 48 // s
    assert out.grid == (h, w)
    assert out.text_len == 7
    assert out.last_hidden_state.shape == (2, 7 + h * w, cfg.hidden_size)
    assert out.pooled.shape == (2, cfg.hidden_size)
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[: 48 // s, : 32 // s] = True
    assert out.visual_mask[0].all()
    assert torch.equal(out.visual_mask[1], expected.flatten())
    assert out.vd.indices.shape == (2, h * w)
    feats, vmask = model.encode_image(batch["pixel_values"], batch["pixel_mask"])
    assert feats.shape == (2, h * w, cfg.hidden_size) and torch.equal(vmask, out.visual_mask)
    # Padded visual tokens are invisible to attention: changing them leaves every real output unchanged.
    tokens = out.vd.quantized.detach().clone()
    hidden, _ = model.fuse(batch["input_ids"], batch["attention_mask"], tokens, out.visual_mask, out.grid)
    tokens[1, ~out.visual_mask[1]] = 100.0
    hidden2, _ = model.fuse(batch["input_ids"], batch["attention_mask"], tokens, out.visual_mask, out.grid)
    real = torch.cat([torch.ones(out.text_len, dtype=torch.bool), out.visual_mask[1]])
    torch.testing.assert_close(hidden2[1, real], hidden[1, real])
    assert not torch.allclose(hidden2[1, ~real], hidden[1, ~real])


def test_backbone_freeze_switch() -> None:
    model = SohoModel(soho_tiny()).train()
    model.set_backbone_trainable(False)
    assert not any(p.requires_grad for p in model.encoder.trunk.parameters())
    assert all(p.requires_grad for p in model.encoder.proj.parameters())
    bns = [m for m in model.encoder.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.train()
    assert bns and not any(bn.training for bn in bns)
    stats = bns[0].running_mean.clone()
    model(**_batch())
    assert torch.equal(bns[0].running_mean, stats)  # frozen BN statistics do not drift
    model.set_backbone_trainable(True)
    assert all(p.requires_grad for p in model.encoder.trunk.parameters()) and all(bn.training for bn in bns)
    model(**_batch())
    assert not torch.equal(bns[0].running_mean, stats)


def test_save_and_load_round_trip_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pt = SohoForPretraining(soho_tiny()).train()
    pt(**_batch(), generator=torch.Generator().manual_seed(0)).loss.backward()  # moves the VD buffers
    pt.eval()
    pt.save_pretrained(tmp_path / "pt")
    assert sorted(os.listdir(tmp_path / "pt")) == ["config.json", "model.safetensors"]
    back = SohoForPretraining.from_pretrained(tmp_path / "pt").eval()
    for (k1, v1), (k2, v2) in zip(pt.state_dict().items(), back.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2), k1
    batch = _batch(seed=1)
    assert torch.equal(pt.itm_logits(**batch), back.itm_logits(**batch))
    # The backbone part of a pre-training checkpoint loads as a SohoModel.
    soho = SohoModel.from_pretrained(tmp_path / "pt").eval()
    assert torch.equal(soho(**batch).last_hidden_state, pt.soho(**batch).last_hidden_state)
    soho.save_pretrained(tmp_path / "m")
    again = SohoModel.from_pretrained(tmp_path / "m")
    assert all(
        torch.equal(a, b)
        for a, b in zip(soho.state_dict().values(), again.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="bare SohoModel"):
        SohoForPretraining.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        SohoModel.from_pretrained(tmp_path / "missing")


def test_small_preset_text_embeddings_are_the_minilm_weights() -> None:
    cfg = soho_small()
    enc = CrossModalEncoder(cfg.transformer)
    ref = load_file(str(Path(default_text_model_path()) / "model.safetensors"))
    bert = enc.bert.state_dict()
    for name in (
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "encoder.layer.5.output.dense.weight",
        "pooler.dense.weight",
    ):
        assert torch.equal(bert[name], ref[name]), name
    # ImageNet trunk: tests/model/test_trunk_weights.py
    grid = GridEncoder(dataclasses.replace(cfg.encoder, weights=None))
    assert grid.proj.out_channels == 384 and grid.total_stride == 64


def test_pretrained_text_model_truncated_to_fewer_layers() -> None:
    """num_layers below the pretrained BERT's: its first num_layers layers are loaded, the rest dropped;
    more layers than it has is an error naming the field."""
    import dataclasses

    cfg = dataclasses.replace(soho_small().transformer, num_layers=2)
    enc = CrossModalEncoder(cfg)
    ref = load_file(str(Path(default_text_model_path()) / "model.safetensors"))
    bert = enc.bert.state_dict()
    assert len(enc.bert.encoder.layer) == 2
    assert not any(k.startswith("encoder.layer.2.") for k in bert)
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight",
                 "embeddings.word_embeddings.weight", "pooler.dense.weight"):
        assert torch.equal(bert[name], ref[name]), name
    with pytest.raises(ValueError, match="num_layers=7"):
        CrossModalEncoder(dataclasses.replace(soho_small().transformer, num_layers=7))


def test_pretraining_losses_are_finite_with_gradients_and_replay() -> None:
    torch.manual_seed(0)
    pt = SohoForPretraining(soho_tiny()).train()
    batch = _batch(b=4)
    out = pt(**batch, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.loss, out.mlm_loss + out.mvm_loss + out.itm_loss)
    for x in (out.mlm_loss, out.mvm_loss, out.itm_loss):
        assert torch.isfinite(x) and x.requires_grad
    for acc in (out.mlm_acc, out.mvm_acc, out.itm_acc):
        assert not acc.requires_grad and 0.0 <= float(acc) <= 1.0
    out.loss.backward()
    assert pt.itm_head.classifier.weight.grad.abs().sum() > 0
    assert pt.soho.encoder.trunk[0].weight.grad.abs().sum() > 0  # straight-through reaches the ResNet
    # No MVM / MLM positions → zero losses that still have a grad_fn.
    pt.config.pretrain.mvm_prob = 0.0
    pt.config.pretrain.mlm_prob = 0.0
    quiet = pt(**batch, generator=torch.Generator().manual_seed(7))
    assert quiet.mvm_loss.item() == 0.0 and quiet.mvm_loss.grad_fn is not None
    assert quiet.mlm_loss.item() == 0.0 and quiet.mlm_loss.grad_fn is not None
    assert int(quiet.mvm_count) == 0 and int(quiet.mlm_count) == 0
    # Same generator seed → same masking and negatives (eval: no dropout, no VD update).
    pt.eval()
    pt.config.pretrain.mvm_prob = pt.config.pretrain.mlm_prob = 0.5
    a = pt(**batch, generator=torch.Generator().manual_seed(3))
    b = pt(**batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.itm_labels, b.itm_labels)


def test_itm_interaction_head_uses_masked_modality_means() -> None:
    """φ([CLS]) + MLP([t̄⊙v̄, |t̄−v̄|]) with means over real positions only; padding cannot move the logits;
    missing inputs are an error; the option round-trips through save/load and itm_logits."""
    from soho.heads import ITMHead

    torch.manual_seed(0)
    head = ITMHead(8, interaction=True)
    pooled, hidden = torch.randn(2, 8), torch.randn(2, 3 + 4, 8)
    am = torch.tensor([[1, 1, 0], [1, 1, 1]])
    vm = torch.tensor([[True, True, True, False], [True, True, True, True]])
    t = torch.stack([hidden[0, :2].mean(0), hidden[1, :3].mean(0)])
    v = torch.stack([hidden[0, 3:6].mean(0), hidden[1, 3:].mean(0)])
    expected = head.classifier(pooled) + head.interaction(torch.cat([t * v, (t - v).abs()], -1))
    torch.testing.assert_close(head(pooled, hidden, am, vm), expected)
    moved = hidden.clone()
    moved[0, 2] += 100.0  # padded text position
    moved[0, 6] -= 100.0  # padded visual position
    torch.testing.assert_close(head(pooled, moved, am, vm), expected)
    with pytest.raises(ValueError, match="interaction=True"):
        head(pooled)
    assert ITMHead(8).interaction is None

    cfg = soho_tiny()
    cfg.pretrain.itm_interaction = True
    model = SohoForPretraining(cfg).eval()
    batch = _batch(b=3)
    out = model(**batch, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert model.itm_head.interaction[0].weight.grad.abs().sum() > 0
    logits = model.itm_logits(**batch)
    soho_out = model.soho(**batch)
    torch.testing.assert_close(
        logits,
        model.itm_head(
            soho_out.pooled, soho_out.last_hidden_state, batch["attention_mask"], soho_out.visual_mask
        ),
    )
    assert logits.shape == (3, 2)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        again = SohoForPretraining.from_pretrained(d).eval()
    assert again.config.pretrain.itm_interaction
    torch.testing.assert_close(again.itm_logits(**batch), logits)


def test_itc_term_is_infonce_of_the_single_modality_passes(tmp_path: Path) -> None:
    """pretrain.itc_weight > 0 adds w · InfoNCE(image-only pass, text-only pass) on the uncorrupted batch:
    the value equals a recomputation from the model's own pieces, the total is the weighted sum, the
    gradient of ITC alone reaches the trunk (through the VD's straight-through path), and the projection
    survives save/load and seeds the retrieval prefilter. Off (the default) adds no parameters and 0."""
    from soho.downstream.modeling import SohoForRetrieval
    from soho.heads import info_nce_loss

    off = SohoForPretraining(soho_tiny())
    assert off.itc is None and not any(k.startswith("itc.") for k in off.state_dict())
    assert off(**_batch(b=3), generator=torch.Generator().manual_seed(0)).itc_loss.item() == 0.0

    cfg = soho_tiny()
    cfg.pretrain.itc_weight = 0.5
    # eval: the VD leaves its codebook alone, so a recomputation matches
    model = SohoForPretraining(cfg).eval()
    batch = _batch(b=4)
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    feats, vmask, grid = model.soho.encode_image_grid(batch["pixel_values"], batch["pixel_mask"])
    tokens = model.soho.visual_dictionary(feats, vmask).quantized
    img = model.itc.embed_image(model.soho.image_only(tokens, vmask, grid))
    txt = model.itc.embed_text(model.soho.text_only(batch["input_ids"], batch["attention_mask"]))
    assert img.shape == txt.shape == (4, cfg.pretrain.itc_embed_dim)
    torch.testing.assert_close(out.itc_loss, info_nce_loss(img, txt, model.itc.logit_scale()))
    torch.testing.assert_close(out.loss, out.mlm_loss + out.mvm_loss + out.itm_loss + 0.5 * out.itc_loss)
    own = (img @ txt.t()).argmax(1) == torch.arange(4)
    assert out.itc_acc.item() == pytest.approx(own.float().mean().item())
    # one image's tokens change → only its row of the image-only pass changes (rows are independent)
    moved = tokens.clone()
    moved[0] += 1.0
    before, after = model.soho.image_only(tokens, vmask, grid), model.soho.image_only(moved, vmask, grid)
    assert not torch.allclose(after[0], before[0]) and torch.allclose(after[1:], before[1:], atol=1e-6)

    model.train()
    model.soho.set_backbone_trainable(True)
    model(**batch, generator=torch.Generator().manual_seed(0)).itc_loss.backward()
    trunk = [p.grad for n, p in model.soho.encoder.named_parameters() if p.requires_grad]
    assert trunk and any(g is not None and g.abs().sum() > 0 for g in trunk)
    assert model.itc.log_inv_temperature.grad is not None

    model.save_pretrained(tmp_path / "pre")
    again = SohoForPretraining.from_pretrained(tmp_path / "pre")
    assert again.config.pretrain.itc_weight == 0.5
    for name, tensor in model.itc.state_dict().items():
        assert torch.equal(again.itc.state_dict()[name], tensor)
    retrieval = SohoForRetrieval.from_backbone(tmp_path / "pre", embed_dim=cfg.pretrain.itc_embed_dim)
    for name, tensor in model.itc.state_dict().items():
        assert torch.equal(retrieval.projection.state_dict()[name], tensor)
    with pytest.raises(ValueError, match="itc_weight"):
        off.itc_embeddings(tokens, vmask, grid, batch["input_ids"], batch["attention_mask"])


def test_hard_negatives_with_itc_follow_the_itc_similarity(monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrain.hard_negatives with ITC on mines ALBEF-style: the swap partners are drawn from the ITC
    image-text similarity of the batch (not from the visual features), and at a low temperature image i
    gets the caption the ITC space puts closest to it."""
    import soho.modeling as modeling

    cfg = soho_tiny()
    cfg.pretrain.itc_weight = 1.0
    cfg.pretrain.hard_negatives = True
    cfg.pretrain.hard_negative_temperature = 1e-4
    cfg.pretrain.itm_neg_prob = 1.0  # every row a negative
    model = SohoForPretraining(cfg).eval()  # eval: the VD codebook stays put between passes
    batch = _batch(b=6, seed=4)
    feats, vmask, grid = model.soho.encode_image_grid(batch["pixel_values"], batch["pixel_mask"])
    tokens = model.soho.visual_dictionary(feats, vmask).quantized
    img, txt = model.itc_embeddings(tokens, vmask, grid, batch["input_ids"], batch["attention_mask"])
    seen: dict[str, torch.Tensor] = {}
    original = modeling.sample_itm_pairs

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = original(*args, **kwargs)
        seen["similarity"], seen["text_index"] = args[4], out[0]
        return out

    monkeypatch.setattr(modeling, "sample_itm_pairs", spy)
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["similarity"], (img @ txt.t()).detach())
    assert out.itm_labels.tolist() == [0] * 6
    nearest = (img @ txt.t()).detach().fill_diagonal_(-float("inf")).argmax(dim=1)
    assert seen["text_index"].tolist() == nearest.tolist()
