"""Seconds per training step of the paper-size networks, and what a full run would take.

A hand-run benchmark, not a test::

    python bench/training_speed.py                     # CPU, both networks, 3 timed steps each
    python bench/training_speed.py --device cuda:0     # bf16 autocast, as `cttriage train --device cuda:0`
    python bench/training_speed.py --network multitask --steps 2

Each step is what ``models.training`` runs: forward, loss, backward and an Adam step on random
input of the paper's batch shape (speed does not depend on the values):

* lungs: 30 slices of 176x176 (a 350 mm field of view at 2 mm);
* multitask: 5 series of 32 slices of 96x160 (a lungs' bounding box at 2 mm; MosMed's are
  80-120 x 140-180), the batch half segmentation, half classification.

The first (warm-up) step is not timed. The extrapolation multiplies the median step by the
paper's 16,000 (lungs) and 30,000 (multitask) steps; validation every 300 steps adds a few percent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.lung_network import LungNetConfig, LungSegmentationNet  # noqa: E402
from models.multitask import MultitaskConfig, MultitaskNet  # noqa: E402
from models.training import PAPER_LUNGS, PAPER_MULTITASK, multitask_loss, training_autocast  # noqa: E402
from models.training_samples import pad_stack  # noqa: E402


def time_steps(network: str, device: torch.device, steps: int) -> list[float]:
    """Seconds of each timed step (after one warm-up step)."""
    options = PAPER_LUNGS if network == "lungs" else PAPER_MULTITASK
    torch.manual_seed(0)
    model: torch.nn.Module = (LungSegmentationNet(LungNetConfig()) if network == "lungs"
                              else MultitaskNet(MultitaskConfig())).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr.initial)
    if network == "lungs":
        images = torch.rand(30, 1, 176, 176, device=device)
        masks = (torch.rand(30, 1, 176, 176, device=device) > 0.5).float()
    else:
        shapes = [(32, 96 + 8 * i, 160 - 8 * i) for i in range(5)]
        images = torch.from_numpy(pad_stack([torch.rand(s).numpy() for s in shapes])).to(device)
        lesions = (torch.rand(images.shape, device=device) > 0.9).float()
        labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], device=device)
        seg_weight = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], device=device)
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with training_autocast(options, device):
            if network == "lungs":
                loss = F.binary_cross_entropy_with_logits(model(images).float(), masks)
            else:
                loss, _, _ = multitask_loss(model, images, lesions, labels, seg_weight, 1.0 - seg_weight,  # type: ignore[arg-type]
                                            options.cls_weight, shapes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--network", choices=["lungs", "multitask", "both"], default="both")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for network in (["lungs", "multitask"] if args.network == "both" else [args.network]):
        seconds = time_steps(network, device, args.steps)
        total = (PAPER_LUNGS if network == "lungs" else PAPER_MULTITASK).steps
        median = statistics.median(seconds)
        print(f"{network}: {median:.2f} s/step ({1 / median:.3f} steps/s) over {len(seconds)} steps; "
              f"{total} steps = {median * total / 3600:.1f} h ({median * total / 86400:.1f} days)")


if __name__ == "__main__":
    main()
