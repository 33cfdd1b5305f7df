"""Seconds per study of the network path, stage by stage, against a plain eager baseline.

A hand-run benchmark, not a test::

    python bench/inference.py                       # 300 slices of 512x512, CPU, paper-size networks
    python bench/inference.py --model MODEL_DIR/v1  # trained weights instead of random ones
    python bench/inference.py --device cuda:0 --repeat 3

One synthetic chest CT (``models.phantom``: 300 slices of 512x512 at 0.7 mm, 1 mm apart) is
written as DICOM files, then each repeat times, as the worker runs them with the networks
loaded and warm (``models.inference.TriageNetworks``):

* ``load``: read the files and stack the HU volume (``worker.pipeline.read_datasets``, ``hu_volume``);
* ``resample``: upload, 2x2 mm in-plane and HU window on the device;
* ``lungs``: lungs network over all slices (``lungs_net``) and the mask split into right and
  left lungs (``lungs_post``);
* ``multitask``: Multitask-Spatial-1 over the slices of the lungs' bounding box, identification;
* ``postprocess``: lesion mask and per-lung severity.

The baseline runs the same two networks in a plain eager loop (``module.eval()``,
``torch.no_grad()``, NCHW, no batch-norm folding, no autocast) on the same slices, with the same
batch size. Without ``--model`` the weights are random: speed does not depend on them, but
their lung masks are meaningless, so ``lungs_post`` and the crop use the phantom's true lung
mask (the crop is then the size a trained network would give).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import LoadedCheckpoint, metadata_for  # noqa: E402
from models.inference import InferenceOptions, TriageNetworks, default_threads  # noqa: E402
from models.lung_network import LungSegmentationNet, lung_bounding_box, lung_labels_from_probabilities  # noqa: E402
from models.model_store import bundle_paths  # noqa: E402
from models.multitask import MultitaskNet  # noqa: E402
from models.phantom import PhantomSpec, phantom_volume  # noqa: E402
from models.phantom_dicom import phantom_datasets  # noqa: E402
from models.predictor import NetworkPredictor  # noqa: E402
from models.severity import lung_severity  # noqa: E402
from models.training_samples import resample_mask  # noqa: E402
from models.volume import hu_volume  # noqa: E402
from worker.pipeline import read_datasets  # noqa: E402


def random_networks(options: InferenceOptions) -> TriageNetworks:
    """Paper-size networks with random weights (speed does not depend on the weights)."""
    torch.manual_seed(0)
    untrained = "untrained: random weights, benchmark only"

    def loaded(module: torch.nn.Module) -> LoadedCheckpoint:
        meta = metadata_for(module, version="bench-random", training_data=untrained)
        return LoadedCheckpoint(module=module.eval(), metadata=meta, path=Path("<random>"))

    return TriageNetworks(loaded(MultitaskNet()), loaded(LungSegmentationNet()), options)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(times: dict[str, list[float]], name: str, device: torch.device, fn: Callable[[], object]) -> object:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    times.setdefault(name, []).append(time.perf_counter() - start)
    return out


def eager_baseline(module: torch.nn.Module, image: torch.Tensor, batch: int, multitask: bool) -> None:
    """The networks as a plain PyTorch loop would run them (what the fast path is compared with)."""
    with torch.no_grad():
        shared = []
        for k in range(0, image.shape[0], batch):
            x = image[k : k + batch].unsqueeze(1).contiguous()
            if multitask:
                seg, features = module.slice_features(x)
                torch.sigmoid(seg)
                shared.append(features)
            else:
                torch.sigmoid(module(x))
        if multitask:
            module.identify(torch.cat(shared).permute(1, 0, 2, 3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--pixel-spacing", type=float, default=0.7)
    parser.add_argument("--slice-spacing", type=float, default=1.0)
    parser.add_argument("--model", help="model bundle directory (default: random paper-size weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all available cores)")
    parser.add_argument("--batch-slices", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    options = InferenceOptions(device=args.device, batch_slices=args.batch_slices, compile=args.compile,
                               threads=args.threads)
    t0 = time.perf_counter()
    networks = TriageNetworks.from_bundle(bundle_paths(args.model), options) if args.model else random_networks(options)
    model_seconds = time.perf_counter() - t0
    predictor = NetworkPredictor(networks)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()} "
          f"(cores available {default_threads()}), batch {args.batch_slices} slices, compile {args.compile}")
    print(f"networks: {networks.method} {networks.version}, built in {model_seconds:.2f} s "
          f"({'trained weights' if args.model else 'random weights'})")

    spec = PhantomSpec(slices=args.slices, rows=args.size, columns=args.size, pixel_spacing=args.pixel_spacing,
                       slice_spacing=args.slice_spacing, severity_left=30.0, severity_right=10.0, seed=3)
    phantom = phantom_volume(spec)
    times: dict[str, list[float]] = {}
    baseline: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, ds in enumerate(phantom_datasets(phantom, spec)):
            path = Path(tmp) / f"{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        print(f"study: {len(files)} slices of {args.size}x{args.size} at {args.pixel_spacing} mm, "
              f"{args.slice_spacing} mm apart")
        for r in range(args.repeat + 1):  # the first pass warms up (allocator, kernels, compile)
            run: dict[str, list[float]] = {} if r == 0 else times
            volume = timed(run, "load", device, lambda: hu_volume(read_datasets(files)))
            hu_t, image, grid = timed(run, "resample", device, lambda: networks.preprocess(volume.hu, volume.spacing))
            if networks.lungs is None:  # a bundle without a lungs network: threshold lungs
                labels = timed(run, "lungs_post", device, lambda: networks.lung_labels(image, hu_t.cpu().numpy(), grid))
            else:
                probs = timed(run, "lungs_net", device, lambda: networks.lung_probabilities(image))
                if args.model:
                    source = probs
                else:  # random weights: post-process the true lungs instead (same work, meaningful crop)
                    source = resample_mask(phantom.lungs > 0, phantom.spacing, grid[1:]).astype(np.float32)
                labels = timed(run, "lungs_post", device, lambda: lung_labels_from_probabilities(source, grid))
            box = lung_bounding_box(labels > 0)
            lesion, ident = timed(run, "multitask", device,
                                  lambda: networks.multitask_outputs(image[box].contiguous()))

            def post() -> object:
                lesions = np.zeros(labels.shape, dtype=bool)
                lesions[box] = lesion >= 0.2
                return lung_severity(labels, lesions, grid)

            severity = timed(run, "postprocess", device, post)
            if args.model:  # trained weights: the worker's own call, end to end after loading
                timed(run, "predict (worker path)", device, lambda: predictor.predict(volume.hu, volume.spacing))
            if r > 0 and not args.no_baseline:
                if networks.lungs_checkpoint is not None:
                    plain_lungs = networks.lungs_checkpoint.module.to(device)
                    timed(baseline, "lungs_net", device,
                          lambda: eager_baseline(plain_lungs, image, args.batch_slices, False))
                plain_multitask = networks.multitask_checkpoint.module.to(device)
                timed(baseline, "multitask", device,
                      lambda: eager_baseline(plain_multitask, image[box].contiguous(), args.batch_slices, True))
    print(f"lungs grid {tuple(image.shape)} at {grid[1]:.2f} mm; multitask crop "
          f"{tuple(s.stop - s.start for s in box)}; identification {ident:.3f}, severity {severity.severity:.1f} %")
    stages = [n for n in ("load", "resample", "lungs_net", "lungs_post", "multitask", "postprocess") if n in times]
    # Best of N is what the code can do; the median shows how much other load on the machine moved it.
    print(f"\n{'stage':14} {'fast best':>10} {'fast median':>12} {'eager best':>11} {'eager median':>13}")
    for name in stages:
        base = (f"{min(baseline[name]):11.2f} {statistics.median(baseline[name]):13.2f}" if name in baseline else "")
        print(f"{name:14} {min(times[name]):10.2f} {statistics.median(times[name]):12.2f} {base}")
    best, median = (sum(f(times[n]) for n in stages) for f in (min, statistics.median))
    print(f"{'total':14} {best:10.2f} {median:12.2f}   s per study, networks loaded, {args.repeat} repeats")
    if "predict (worker path)" in times:
        worker = [a + b for a, b in zip(times["load"], times["predict (worker path)"], strict=True)]
        print(f"load + NetworkPredictor.predict (the worker's call): best {min(worker):.2f} s, "
              f"median {statistics.median(worker):.2f} s")
    if baseline:
        nets = [n for n in ("lungs_net", "multitask") if n in baseline]
        fast = sum(min(times[n]) for n in nets)
        slow = sum(min(baseline[n]) for n in nets)
        slices = (image.shape[0] if "lungs_net" in nets else 0) + (box[0].stop - box[0].start)
        print(f"networks only (best of {args.repeat}): fast {fast:.2f} s ({slices / fast:.0f} slices/s) vs eager "
              f"{slow:.2f} s ({slices / slow:.0f} slices/s): {slow / fast:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
