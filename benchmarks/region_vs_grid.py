"""SOHO's inference path vs a BUTD-style region pipeline, same images, same transformer, one run.

SOHO: grid encoder (ResNet → 2×2 max-pool → 1×1 conv) → visual dictionary → cross-modal transformer → ITM.
Region (BUTD-style, built from torchvision parts, random weights): ResNet-101 C4 trunk (stride 16) → RPN on
C4 (15 anchors, NMS, 100 proposals) → RoIAlign 14×14 on C4 → res5 head (layer4) → mean-pool → 2048-d region
features → linear to the transformer width → the same cross-modal transformer → ITM. BUTD's 1600-class box
head and class-wise NMS are not run, which favours the region pipeline (the ratio printed is conservative).

    python benchmarks/region_vs_grid.py [--preset base] [--device cuda --dtype bf16] [--repeats 5]

Prints images/s of each path at batch 1 and 8 on 600×1000 images, and the ratio.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import RoIAlign

from soho import SohoForPretraining, get_preset


class RegionPipeline(nn.Module):
    """Detector-feature front end + the same transformer and ITM head as the SOHO model it is given."""

    def __init__(self, soho: SohoForPretraining, proposals: int = 100) -> None:
        super().__init__()
        r = torchvision.models.resnet101(weights=None)
        self.c4 = nn.Sequential(
            r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3
        )  # stride 16, 1024 ch
        self.res5 = r.layer4  # the region head: 14×14 RoI → 7×7, 2048 ch
        anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(1024, anchors.num_anchors_per_location()[0]), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=256, positive_fraction=0.5, pre_nms_top_n={"training": 2000, "testing": 1000},
            post_nms_top_n={"training": proposals, "testing": proposals}, nms_thresh=0.7,
        )  # fmt: skip
        self.roi_align = RoIAlign((14, 14), spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
        width = soho.config.transformer.hidden_size
        self.to_width = nn.Linear(2048, width)
        self.soho = soho

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        b, _, h, w = images.shape
        feats = self.c4(images)  # (B, 1024, H/16, W/16)
        boxes, _ = self.rpn(ImageList(images, [(h, w)] * b), OrderedDict([("c4", feats)]))
        n = min(len(x) for x in boxes)
        rois = self.roi_align(feats, [x[:n] for x in boxes])  # (B·n, 1024, 14, 14)
        region = self.res5(rois).mean(dim=(2, 3)).view(b, n, 2048)  # (B, n, 2048)
        tokens = self.to_width(region)  # (B, n, C)
        mask = torch.ones(b, n, dtype=torch.bool, device=images.device)
        # Regions have no grid; a 1×n "grid" gives them distinct position codes in the same transformer.
        _, pooled = self.soho.soho.fuse(input_ids, attention_mask, tokens, mask, (1, n))
        return self.soho.itm_head(pooled)


def soho_path(
    model: SohoForPretraining, images: torch.Tensor, ids: torch.Tensor, am: torch.Tensor
) -> torch.Tensor:
    mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
    return model.itm_logits(images, mask, ids, am)


def time_it(fn, repeats: int, sync) -> float:  # noqa: ANN001
    fn()  # warm-up (allocations, cuDNN autotune)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", default="base", help="SOHO preset for the grid path and the shared transformer"
    )
    p.add_argument("--no-pretrained-text", action="store_true", help="random-init the transformer (offline)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--text-len", type=int, default=20)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    cfg.transformer.name_or_path = (
        None  # random weights: speed does not depend on them, and nothing downloads
    )
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    grid = SohoForPretraining(cfg, load_pretrained=False).to(dev, dtype).eval()
    region = RegionPipeline(grid).to(dev, dtype).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"preset={args.preset} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"image={args.height}x{args.width} repeats={args.repeats}")  # fmt: skip
    for b in (int(x) for x in args.batches.split(",")):
        images = torch.randn(b, 3, args.height, args.width, device=dev, dtype=dtype)
        ids = torch.randint(1000, 5000, (b, args.text_len), device=dev)
        am = torch.ones_like(ids)
        with torch.inference_mode():
            t_grid = time_it(lambda: soho_path(grid, images, ids, am), args.repeats, sync)  # noqa: B023
            t_region = time_it(lambda: region(images, ids, am), args.repeats, sync)  # noqa: B023
        print(f"batch {b}: SOHO grid {b / t_grid:8.2f} img/s | region (BUTD-style) {b / t_region:8.2f} img/s | "
              f"ratio {t_region / t_grid:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
