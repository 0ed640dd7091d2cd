"""SOHO's inference path vs the BUTD region pipeline (Anderson et al. 2018, the paper's baseline), same
images, same transformer, one run, random weights.

SOHO (grid): ResNet → 2×2 max-pool → 1×1 conv → visual dictionary → cross-modal transformer → ITM.

Region, as bottom-up-attention's ``generate_tsv.py`` runs its ResNet-101 Faster R-CNN (built here from torch /
torchvision parts, random weights):

  trunk      ResNet-101 C4 (conv1…res4, stride 16, 1024 ch)
  proposals  RPN on C4: 12 anchors (sizes 64…512, ratios ½/1/2), 6000 pre-NMS, NMS 0.7, 300 proposals kept
  res5       RoI pooling 14×14 on C4 → res5 (ResNet layer4, stride 2 → 7×7×2048) → mean → 2048-d ``pool5``
  heads      box head (1601-class softmax + 1601×4 box deltas), attribute head (class embedding 256 ⊕
             pool5 → 512 → 401-class softmax), then class-wise NMS (IoU 0.3) for each of the 1600 object
             classes over the 300 proposals (one NMS per class and image, as BUTD's loop does), and the box
             selection below
  transformer  the kept boxes' pool5 features → linear to the transformer width → the same cross-modal
             transformer and ITM head as SOHO's (regions get a 1×n "grid" of position codes)

Box selection (BUTD's rule). ``max_conf[i]`` = the highest class score proposal i keeps in any class's NMS (0
where every class suppressed it). BUTD keeps the proposals with ``max_conf ≥ 0.2``, at least MIN_BOXES and at
most MAX_BOXES of them, topping up / cutting by ``max_conf`` order. With random weights the number that passes
0.2 is arbitrary, so this benchmark fixes MIN_BOXES = MAX_BOXES = N (BUTD's common N = 36, and N = 100): the
kept set is the N proposals of highest ``max_conf`` (ties: lower proposal index first, i.e. higher RPN
objectness) — every proposal above 0.2 first, then, when fewer than N pass, the highest-scoring remaining ones
fill up deterministically to N; when more pass, the top N. Every image then has exactly N boxes (asserted).

Light variant ("fixed boxes"): the same trunk and RPN, then only the top-N RPN proposals go through RoI
pooling and res5 into the transformer — no box/attribute heads, no class-wise NMS, res5 on N RoIs instead
of 300.
This is a lower bound on any detector front end; the faithful variant is what BUTD features cost.

Workload assertions (a check pass at the smallest batch runs before any timing, and every timed pass asserts
again before its times are kept): 300 proposals into the heads per image, res5 output (B·300, 2048, 7, 7),
class-wise NMS run over exactly 1600 classes × 300 proposals per image, exactly N boxes per image, pooled
region features (B, N, 2048), SOHO's visual tokens (B, L, C).

Timing: each stage is synchronised and timed on its own; the region variants share the trunk and proposal
stages of one pass (they are the same computation), and their totals are the sums of their stages. Medians
over ``--repeats`` passes. The random-weight 101-layer trunk outputs C4 values of RMS ~5e4, which make the
random RPN's boxes degenerate, so the C4 map is scaled to unit RMS per image (a cheap op, counted in
``trunk``) — without it torchvision's RPN kept 0 boxes per image at 600×1000, and the earlier "region" figure
timed a detector that detected nothing.

    python benchmarks/region_vs_grid.py [--preset base] [--batches 1,8] [--repeats 1] [--boxes 36,100]
    python benchmarks/region_vs_grid.py --device cuda --dtype bf16 --repeats 5     # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import RoIPool, nms

from soho import SohoForPretraining, get_preset

NUM_PROPOSALS = 300  # BUTD: TEST.RPN_POST_NMS_TOP_N
NUM_CLASSES = 1600  # Visual Genome objects (+1 background in the softmax)
NUM_ATTRIBUTES = 400  # Visual Genome attributes (+1 "no attribute")
CONF_THRESH = 0.2  # BUTD generate_tsv.py conf_thresh
CLASS_NMS_IOU = 0.3  # BUTD cfg.TEST.NMS


def select_boxes(max_conf: torch.Tensor, min_boxes: int, max_boxes: int,
                 conf: float = CONF_THRESH) -> torch.Tensor:
    """BUTD's rule: the proposals with ``max_conf ≥ conf``, topped up to ``min_boxes`` / cut to ``max_boxes``
    by ``max_conf`` order (stable: ties keep proposal order). Returns proposal indices, highest ``max_conf``
    first."""
    order = torch.sort(max_conf, descending=True, stable=True).indices
    n_pass = int((max_conf >= conf).sum())
    return order[: min(max(n_pass, min_boxes), max_boxes)]


def classwise_max_conf(boxes: torch.Tensor, scores: torch.Tensor,
                       iou: float = CLASS_NMS_IOU) -> tuple[torch.Tensor, int]:
    """BUTD's per-image loop: for every object class (softmax column 1…1600) NMS over all proposals with that
    class's scores; ``max_conf[i]`` = the best score proposal i keeps in any class. Returns (max_conf,
    classes run)."""
    max_conf = torch.zeros(boxes.shape[0], dtype=torch.float32, device=boxes.device)
    boxes, scores = boxes.float(), scores.float()
    classes = 0
    for c in range(1, scores.shape[1]):
        keep = nms(boxes, scores[:, c], iou)
        max_conf[keep] = torch.maximum(max_conf[keep], scores[keep, c])
        classes += 1
    return max_conf, classes


class Stopwatch:
    """Per-stage wall times of one pass (device-synchronised at each boundary)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: dict[str, float] = {}
        self._t = 0.0

    def start(self) -> None:
        self.sync()
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._t
        self._t = now


class RegionPipeline(nn.Module):
    """BUTD's ResNet-101 C4 Faster R-CNN front end + the same transformer and ITM head as ``soho``."""

    def __init__(self, soho: SohoForPretraining) -> None:
        super().__init__()
        r = torchvision.models.resnet101(weights=None)
        self.c4 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)  # /16, 1024
        anchors = AnchorGenerator(sizes=((64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))  # 12
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(1024, anchors.num_anchors_per_location()[0]), fg_iou_thresh=0.7,
            bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n={"training": 12000, "testing": 6000},
            post_nms_top_n={"training": 2000, "testing": NUM_PROPOSALS}, nms_thresh=0.7,
        )  # fmt: skip
        self.roi_pool = RoIPool((14, 14), spatial_scale=1 / 16)
        self.res5 = r.layer4  # 14×14 RoI → 7×7×2048
        self.cls_score = nn.Linear(2048, NUM_CLASSES + 1)
        self.bbox_pred = nn.Linear(2048, 4 * (NUM_CLASSES + 1))
        self.cls_embedding = nn.Embedding(NUM_CLASSES + 1, 256)
        self.fc_attr = nn.Linear(2048 + 256, 512)
        self.attr_score = nn.Linear(512, NUM_ATTRIBUTES + 1)
        self.to_width = nn.Linear(2048, soho.config.transformer.hidden_size)
        self.soho = soho

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """C4 features scaled to unit RMS per image: a random-weight 101-layer trunk (BatchNorm at its init
        statistics) outputs values of RMS ~5e4, which make the random RPN's boxes degenerate (0 kept)."""
        feats = self.c4(images)
        rms = feats.float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-6)
        return feats / rms.to(feats.dtype)

    def proposals(self, images: torch.Tensor, feats: torch.Tensor) -> list[torch.Tensor]:
        """torchvision's RPN forward (eval), with the head in the model dtype and the anchors, box decoding
        and NMS in fp32 (torchvision's NMS has no bf16 kernel; bf16 box coordinates would be off by
        pixels)."""
        b, _, h, w = images.shape
        sizes = [(h, w)] * b
        objectness, deltas = self.rpn.head([feats])
        grid = [feats.new_empty((b, 1, *feats.shape[-2:]), dtype=torch.float32)]  # shape + dtype for anchors
        anchors = self.rpn.anchor_generator(ImageList(images, sizes), grid)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.rpn.box_coder.decode(deltas.float(), anchors).view(b, -1, 4)
        boxes, _ = self.rpn.filter_proposals(proposals, objectness.float(), sizes, per_level)
        return boxes  # per image (≤ 300, 4), sorted by objectness

    def pooled(self, feats: torch.Tensor, boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI pooling → res5 → mean: (ΣN_i, 2048) pool5 features and the res5 maps (for the shape check)."""
        # RoI pooling in fp32 (torchvision's roi_pool has no bf16 kernel), res5 in the model dtype.
        maps = self.res5(self.roi_pool(feats.float(), [x.float() for x in boxes]).to(feats.dtype))
        return maps.mean(dim=(2, 3)), maps

    def heads(self, pool5: torch.Tensor, boxes: list[torch.Tensor],
              n_keep: list[int]) -> dict[int, list[torch.Tensor]]:
        """Box and attribute heads on all proposals, class-wise NMS, BUTD's selection for each N in
        ``n_keep``.
        Returns {N: [kept proposal indices per image]}."""
        cls_prob = torch.softmax(self.cls_score(pool5).float(), dim=1)  # (ΣP, 1601)
        # (ΣP, 6404): computed as in BUTD's net (generate_tsv keeps the RoIs themselves)
        self.bbox_pred(pool5)
        emb = self.cls_embedding(cls_prob.argmax(dim=1))
        attr_hidden = torch.relu(self.fc_attr(torch.cat([pool5, emb], dim=1)))
        attr_prob = torch.softmax(self.attr_score(attr_hidden), dim=1)
        assert attr_prob.shape == (pool5.shape[0], NUM_ATTRIBUTES + 1)
        kept: dict[int, list[torch.Tensor]] = {n: [] for n in n_keep}
        for img_boxes, prob in zip(boxes, cls_prob.split([len(x) for x in boxes]), strict=True):
            assert prob.shape == (NUM_PROPOSALS, NUM_CLASSES + 1), f"class scores {tuple(prob.shape)}"
            max_conf, classes = classwise_max_conf(img_boxes, prob)
            assert classes == NUM_CLASSES, f"class-wise NMS ran over {classes} classes, not {NUM_CLASSES}"
            for n in n_keep:
                kept[n].append(select_boxes(max_conf, n, n))
        return kept

    def transformer(self, region: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = region.shape
        tokens = self.to_width(region)  # (B, n, C)
        mask = torch.ones(b, n, dtype=torch.bool, device=region.device)
        hidden, pooled = self.soho.soho.fuse(input_ids, attention_mask, tokens, mask, (1, n))
        return self.soho.itm_head(pooled, hidden, attention_mask, mask)


def soho_pass(model: SohoForPretraining, images, ids, am, watch: Stopwatch) -> torch.Tensor:  # noqa: ANN001
    watch.start()
    mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
    features, visual_mask, grid = model.soho.encode_image_grid(images, mask)
    watch.lap("trunk")
    vd = model.soho.visual_dictionary(features, visual_mask)
    watch.lap("vd")
    hidden, pooled = model.soho.fuse(ids, am, vd.quantized, visual_mask, grid)
    logits = model.itm_head(pooled, hidden, am, visual_mask)
    watch.lap("transformer")
    b, c = images.shape[0], model.config.transformer.hidden_size
    assert features.shape == (b, grid[0] * grid[1], c), f"SOHO visual tokens {tuple(features.shape)}"
    assert logits.shape == (b, 2)
    return logits


def region_pass(
    region: RegionPipeline, images, ids, am, n_boxes: list[int], sync: Callable[[], None]  # noqa: ANN001
) -> dict[str, dict[str, float]]:
    """One pass of every region variant; returns {variant: {stage: seconds}} after asserting the workload."""
    b = images.shape[0]
    shared = Stopwatch(sync)
    shared.start()
    feats = region.trunk(images)
    shared.lap("trunk")
    boxes = region.proposals(images, feats)
    shared.lap("proposals/heads")
    counts = [len(x) for x in boxes]
    assert counts == [NUM_PROPOSALS] * b, f"RPN kept {counts} proposals per image, need {NUM_PROPOSALS}"
    out: dict[str, dict[str, float]] = {}
    for n in n_boxes:  # light: top-N RPN proposals straight into res5 and the transformer
        w = Stopwatch(sync)
        w.start()
        pool5, maps = region.pooled(feats, [x[:n] for x in boxes])
        w.lap("res5")
        region_feats = pool5.view(b, n, 2048)
        assert maps.shape == (b * n, 2048, 7, 7) and region_feats.shape == (b, n, 2048)
        assert region.transformer(region_feats, ids, am).shape == (b, 2)
        w.lap("transformer")
        out[f"light-{n}"] = {**shared.times, **w.times}
    w = Stopwatch(sync)  # faithful: all 300 proposals through res5 and the heads, NMS, selection
    w.start()
    pool5, maps = region.pooled(feats, boxes)
    w.lap("res5")
    assert maps.shape == (b * NUM_PROPOSALS, 2048, 7, 7), f"res5 maps {tuple(maps.shape)}"
    kept = region.heads(pool5, boxes, n_boxes)
    w.lap("proposals/heads")
    pool5 = pool5.view(b, NUM_PROPOSALS, 2048)
    for n in n_boxes:
        assert [len(k) for k in kept[n]] == [n] * b, f"boxes per image {[len(k) for k in kept[n]]}, need {n}"
        t = Stopwatch(sync)
        t.start()
        region_feats = torch.stack([pool5[i, k] for i, k in enumerate(kept[n])])  # (B, N, 2048)
        assert region_feats.shape == (b, n, 2048)
        assert region.transformer(region_feats, ids, am).shape == (b, 2)
        t.lap("transformer")
        times = {**shared.times, "res5": w.times["res5"], "transformer": t.times["transformer"]}
        times["proposals/heads"] += w.times["proposals/heads"]
        out[f"BUTD-{n}"] = times
    return out


STAGES = ("trunk", "vd", "proposals/heads", "res5", "transformer")


def main(argv: list[str] | None = None) -> dict[int, dict[str, dict[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base",
                   help="SOHO preset for the grid path and the shared transformer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--boxes", default="36,100",
                   help="fixed region counts N (BUTD's MIN_BOXES = MAX_BOXES = N)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per batch size (median)")
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--text-len", type=int, default=20)
    args = p.parse_args(argv)
    n_boxes = [int(x) for x in args.boxes.split(",")]
    if any(not 1 <= n <= NUM_PROPOSALS for n in n_boxes):
        raise ValueError(f"--boxes {args.boxes}: each N must be in 1..{NUM_PROPOSALS}")
    batches = [int(x) for x in args.batches.split(",")]
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    # random weights: speed does not depend on them, and nothing downloads
    cfg.transformer.name_or_path = None
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    grid = SohoForPretraining(cfg, load_pretrained=False).to(dev, dtype).eval()
    region = RegionPipeline(grid).to(dev, dtype).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"preset={args.preset} ({cfg.encoder.backbone}) device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} image={args.height}x{args.width} repeats={args.repeats} "
          f"boxes={n_boxes} proposals={NUM_PROPOSALS} classes={NUM_CLASSES}")  # fmt: skip

    def inputs(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(b)
        images = torch.randn(b, 3, args.height, args.width, generator=g).to(dev, dtype)
        ids = torch.randint(1000, 5000, (b, args.text_len), generator=g).to(dev)
        return images, ids, torch.ones_like(ids)

    results: dict[int, dict[str, dict[str, float]]] = {}
    with torch.inference_mode():
        check = inputs(min(batches))  # workload check + warm-up, untimed
        soho_pass(grid, *check, Stopwatch(sync))
        region_pass(region, *check, n_boxes, sync)
        print(f"workload checked at batch {min(batches)}: {NUM_PROPOSALS} proposals/image into the heads, "
              f"class-wise NMS over {NUM_CLASSES} classes, boxes/image exactly {n_boxes}")
        for b in batches:
            images, ids, am = inputs(b)
            runs: dict[str, list[dict[str, float]]] = defaultdict(list)
            for _ in range(args.repeats):
                w = Stopwatch(sync)
                soho_pass(grid, images, ids, am, w)
                runs["SOHO grid"].append(w.times)
                for name, times in region_pass(region, images, ids, am, n_boxes, sync).items():
                    runs[name].append(times)
            med = {
                name: {s: statistics.median(r[s] for r in rs) for s in rs[0]} | {"total": statistics.median(
                    sum(r.values()) for r in rs)} for name, rs in runs.items()
            }  # fmt: skip
            results[b] = med
            print(f"batch {b}: seconds per batch (median of {args.repeats}), img/s, per-stage breakdown")
            t_grid = med["SOHO grid"]["total"]
            for name, m in med.items():
                stages = "  ".join(f"{s} {m[s]:7.2f}" for s in STAGES if s in m)
                ratio = "" if name == "SOHO grid" else f"  {m['total'] / t_grid:5.2f}x SOHO's time"
                print(f"  {name:10s} total {m['total']:7.2f} s  {b / m['total']:7.2f} img/s | "
                      f"{stages}{ratio}")
            for n in n_boxes:
                print(f"batch {b} ratio: BUTD region ({n} boxes) / SOHO grid = "
                      f"{med[f'BUTD-{n}']['total'] / t_grid:.2f}x  (light {n}-box front end: "
                      f"{med[f'light-{n}']['total'] / t_grid:.2f}x)")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
