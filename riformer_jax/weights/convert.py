"""Import PyTorch weights as riformer_jax models, and export trained students back.

`python convert.py ...` from a clone, `riformer-convert ...` where the package is
installed.

  # timm / sail-sg / MMPreTrain / GFNet checkpoint -> orbax directory + manifest.json
  python convert.py --arch riformer_s12 --src riformer-s12_in1k.pth --dst ckpt/riformer_s12
  python convert.py --arch caformer_s18 --src model.safetensors --dst ckpt/caformer_s18
  # by name: a timm hub repository (it says its architecture), or a URL (sha256-checked)
  python convert.py --src hf-hub:timm/poolformer_s12.sail_in1k --dst ckpt/poolformer_s12
  python convert.py --arch riformer_s12 --dst ckpt/riformer_s12 --src \
      https://download.openmmlab.com/mmclassification/v1/riformer/riformer-s12_32xb128_in1k_20230406-6741ce71.pth
  python convert.py --arch poolformer_s12 --src poolformer_s12.pth.tar --dst ckpt/pf \\
      --num-classes 100          # new, freshly initialised classifier for fine-tuning

  # converted or trained RIFormer -> MMPreTrain checkpoint ({"state_dict": ...})
  python convert.py --to-torch --src ckpt/riformer_s12 --dst riformer_s12.pth [--deploy]

Load a converted directory with `riformer_jax.load_pretrained(DIR)`.
"""

import argparse
import sys

from riformer_jax.models import counting, registry
from riformer_jax.weights import hub, pretrained, torch_io, torch_keys


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True,
                      help="PyTorch file to import (.pth, .pth.tar, .bin, .safetensors), "
                      "hf-hub:OWNER/NAME[@revision], an http(s) URL, or with --to-torch "
                      "a converted directory")
  parser.add_argument("--dst", required=True,
                      help="directory to write, or with --to-torch the .pth file")
  parser.add_argument("--arch", choices=registry.list_models(), metavar="ARCH",
                      help="registry name of the model in --src, e.g. riformer_s12 "
                      "(a timm hub repository names its own)")
  parser.add_argument("--sha256",
                      help="expected sha256 of a URL's download (default: the hex prefix "
                      "in the file name, torch.hub's convention, where there is one)")
  parser.add_argument("--format", default="auto",
                      choices=("auto",) + torch_keys.FORMATS,
                      help="key layout of --src (default: detected from the keys)")
  parser.add_argument("--num-classes", type=int,
                      help="replace the classifier by a new one with this many outputs")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of a classifier re-initialised by --num-classes")
  parser.add_argument("--to-torch", action="store_true",
                      help="export a converted or trained model to MMPreTrain's format")
  parser.add_argument("--deploy", action="store_true",
                      help="with --to-torch: write RIFormer's re-parameterised form")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --dst if it exists")
  args = parser.parse_args(argv)
  if args.to_torch:
    for flag in ("arch", "num_classes", "sha256"):
      if getattr(args, flag) is not None:
        parser.error(f"--{flag.replace('_', '-')} does not apply to --to-torch "
                     "(the directory's manifest says what it holds)")
  else:
    if args.arch is None and not args.src.startswith(hub.HF_PREFIX):
      parser.error("--arch is required to import a PyTorch checkpoint (only a timm hub "
                   "repository says which model it holds)")
    if args.deploy:
      parser.error("--deploy applies to --to-torch; an MMPreTrain deploy checkpoint "
                   "is recognised as such on import")
    if args.num_classes is not None and args.num_classes < 1:
      parser.error(f"--num-classes {args.num_classes}: must be at least 1")
  return args


def main(argv=None):
  args = parse_args(argv)
  try:
    if args.to_torch:
      keys = torch_io.export_torch_checkpoint(args.src, args.dst, deploy=args.deploy,
                                                overwrite=args.overwrite)
      print(f"wrote {args.dst}: MMPreTrain state dict, {len(keys)} tensors"
            f"{' (deploy form)' if args.deploy else ''}")
    else:
      manifest = pretrained.convert_torch_checkpoint(
          args.src, args.dst, args.arch, args.format, args.num_classes, args.seed,
          overwrite=args.overwrite, sha256=args.sha256)
      _, variables = pretrained.load_pretrained(args.dst)
      print(f"wrote {args.dst}: {manifest['model']} {manifest['kwargs']} from a "
            f"{manifest['format']} checkpoint, "
            f"{counting.count_params(variables['params']):,} parameters")
  except (OSError, ValueError, KeyError, ImportError) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
