"""Measure a trained GAN: how good its faces are and how well its fakes are caught.

    python evaluate.py runs/generative_model/001-celeba-64                      # metrics.json, TensorBoard
    python evaluate.py runs/generative_model/001-celeba-64 --detector-steps 2000  # (re)fine-tune detector.pt first
    python evaluate.py RUN --inception-weights weights-inception-2015-12-05-6726825d.pth   # adds FID and KID
    python evaluate.py RUN --dataset folder --data-root other/faces --out reports/other    # a report on other data

Written next to the checkpoint, or into --out DIR: metrics.json, detector.pt (when
fine-tuning) and the TensorBoard scalars, PR curves and score histograms, in RUN/eval (or
DIR itself). The TensorBoard folder holds one report: a new one replaces the events file of
the last, so no test_* scalar appears twice.

Protocol. Splits are the dataset's own (CelebA's partition, or the fixed file-name hash):
the detector trains on the train split, its threshold is picked on the valid split, and
the report uses the test split, which nothing before has seen, against fakes from noise
seeds used nowhere else. Every fake is rounded to 8 bits like the real files. Each test is
run twice: on clean images and after JPEG re-compression at quality 50 (both classes).
"""

import os
import sys

import checkpoint
import metrics
from cli import ArgumentParser, UserError, add_device_flag, at_least, pick_device, run_cli


# -----------------------------------------------------------------------------
# the command

def get_args_parser():
    p = ArgumentParser(description="Evaluate a trained GAN: SWD (and FID/KID), the raw D, a fine-tuned detector and the spectrum baseline.")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder or its checkpoint.pt; results are written next to it unless --out is given")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write metrics.json, TensorBoard and a fine-tuned detector.pt here instead (for reports on other data); "
                        "a detector.pt here is used before the run's")
    p.add_argument("--detector-steps", type=at_least(0), default=0,
                   help="fine-tune a new detector.pt for this many steps first (0: use the one in --out or the run's, if there is one)")
    p.add_argument("--detector-data", default=None, metavar="DIR",
                   help="extra labelled faces for fine-tuning: DIR/real/ and DIR/fake/ (e.g. FaceForensics++ crops)")
    p.add_argument("--eval-images", type=at_least(2), default=1000, help="valid and test images used (each split)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"Inception-v3 2015-12-05 weights for FID/KID ({metrics.INCEPTION_URL}); without them FID is skipped")
    p.add_argument("--dataset", choices=("celeba", "folder", "synthetic"), default=None, help="override the run's dataset")
    p.add_argument("--data-root", default=None, help="override the run's data root (the data moved)")
    p.add_argument("--workers", type=at_least(0), default=None, help="DataLoader processes (default: the run's)")
    add_device_flag(p)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    ckpt = checkpoint.load(args.run)
    path = checkpoint.resolve(args.run)
    run_dir = os.path.dirname(os.path.abspath(path))
    cfg = dict(ckpt["config"])
    for key in ("dataset", "data_root", "workers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = pick_device(args.device)
    G, D = checkpoint.models_from(ckpt, path, device)
    out_dir = os.path.abspath(args.out) if args.out else run_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {args.out} is a file; give a folder (it is created when missing)")
    # the run's own events file already holds the training curves (and main.py's report): the report gets a folder of its own
    tb_dir = os.path.join(run_dir, "eval") if out_dir == run_dir else out_dir
    writer = metrics.report_writer(tb_dir)
    try:
        metrics.evaluate_run(cfg, G, D, run_dir, step=ckpt.get("step", 0), epoch=ckpt.get("epoch"), detector_steps=args.detector_steps,
                     eval_images=args.eval_images, inception_weights=args.inception_weights,
                     detector_data=args.detector_data, device=device, writer=writer, out_dir=out_dir)
    finally:
        writer.close()
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}; TensorBoard: tensorboard --logdir {tb_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
