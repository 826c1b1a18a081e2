"""The paper's analyses of trained models: ERFs (Fig. 4), features (Fig. 5), affine (Fig. 6).

  python -m riformer_jax.analysis erf --models runs/demo/teacher/student \\
      runs/demo/distilled/student --labels PoolFormer RIFormer --out out/erf
  python -m riformer_jax.analysis features --models TEACHER STUDENT... --out out/features
  python -m riformer_jax.analysis affine --models MI_STUDENT NO_MI_STUDENT \\
      --labels "with MI" "without MI" --blocks 0/0 2/5 3/0 --out out/affine

Each reads directories that `load_pretrained` reads (convert.py, train.py) and writes
a PNG figure, the arrays behind it (`.npz`) and the summary numbers (`.json`) into
`--out`. The images for `erf` and `features` come from the input pipeline's evaluation
transform (default: the embedded synthetic set's test split at its native 96 px).
docs/analysis.md explains every number. The functions below work on any
`(module, variables)` and numpy images, e.g. from a notebook.

Stages are numbered from 0 like the parameters (`stages_0` is the paper's "Stage 1");
negative numbers count from the last. A stage's output is the `block_output` tap of its
last block (sown into "intermediates" by every model here, students and teachers).
"""

import argparse
import functools
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from matplotlib.figure import Figure

from riformer_jax.data import pipeline, sources, synthetic
from riformer_jax.weights import pretrained, store

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)  # RepLKNet's high-contribution area ratios
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
_W1_LEVELS = (np.arange(1000) + 0.5) / 1000  # quantile grid of the Wasserstein distance
_HIST_BINS = 100


# ---------------------------------------------------------------- images and taps


def load_images(dataset="synthetic", split="test", num_images=50, resolution=None,
                data_dir=None, crop_pct=None):
  """The first `num_images` of a split through the evaluation transform, as numpy NHWC
  float32 normalised like the training inputs.

  `resolution` defaults to the synthetic set's native 96 px, or 224 for other data
  sets; `crop_pct` (timm's resize-then-centre-crop) to no resize for the synthetic set
  (a centre crop when `resolution` < 96) and 0.9 otherwise; 0 means no resize.
  """
  # TensorFlow is slow to import and only the image analyses need it.
  native = dataset == "synthetic"
  resolution = resolution or (synthetic.IMAGE_SIZE if native else 224)
  if crop_pct is None:
    crop_pct = 0 if native else 0.9
  if native and not crop_pct and resolution > synthetic.IMAGE_SIZE:
    raise ValueError(f"the synthetic images are {synthetic.IMAGE_SIZE} px; for "
                     f"--resolution {resolution} resize them with --crop_pct 1")
  source = sources.get_source(dataset, split, data_dir=data_dir)
  num_images = min(num_images, source.num_examples)
  batches = pipeline.eval_batches(
      source, global_batch_size=min(num_images, 64), size=resolution,
      crop_pct=crop_pct or None)
  images = []
  for batch in batches:
    images.extend(batch["image"][batch["mask"]])
    if len(images) >= num_images:
      break
  return np.stack(images[:num_images])


def stage_outputs(intermediates):
  """The last block's `block_output` of every stage, in order, from the taps.

  Layouts: `stages_i/blocks_j` (MetaFormer, MetaFormerBaseline), `blocks_i_j`
  (GFNet-H) and `blocks_j` (GFNet, a single stage).
  """
  stages = {}
  for key, node in intermediates.items():
    if match := re.fullmatch(r"stages_(\d+)", key):
      stages[int(match[1])] = {int(k[len("blocks_"):]): v for k, v in node.items()
                               if re.fullmatch(r"blocks_\d+", k)}
    elif match := re.fullmatch(r"blocks_(\d+)_(\d+)", key):
      stages.setdefault(int(match[1]), {})[int(match[2])] = node
    elif match := re.fullmatch(r"blocks_(\d+)", key):
      stages.setdefault(0, {})[int(match[1])] = node
  if not stages:
    raise ValueError("found no block taps (stages_i/blocks_j/block_output) in "
                     f"'intermediates' (top-level keys: {sorted(intermediates)})")
  return [blocks[max(blocks)]["block_output"][-1] for _, blocks in sorted(stages.items())]


def _stage_taps(module, variables, images):
  _, state = module.apply(variables, images, train=False, mutable=["intermediates"])
  return stage_outputs(state["intermediates"])


def check_stage(module, variables, images, stage):
  """`stage` as an index in [0, num_stages), or an error naming the stages there are."""
  shapes = jax.eval_shape(functools.partial(_stage_taps, module), variables, images[:1])
  if not -len(shapes) <= stage < len(shapes):
    raise ValueError(f"{type(module).__name__} has {len(shapes)} stage(s), numbered 0 to "
                     f"{len(shapes) - 1} (or -1 for the last); there is no stage {stage}")
  return stage % len(shapes)


def _batched(images, batch_size):
  """Chunks of `batch_size` images, the last one zero-padded (one compilation), each
  with the number of real images in it."""
  batch_size = min(batch_size, len(images))
  for start in range(0, len(images), batch_size):
    chunk = np.asarray(images[start:start + batch_size], np.float32)
    padding = np.zeros((batch_size - len(chunk), *chunk.shape[1:]), np.float32)
    yield jnp.asarray(np.concatenate([chunk, padding])), len(chunk)


# ---------------------------------------------------------------- ERF (Fig. 4)


def erf_map(module, variables, images, stage=-1, batch_size=16):
  """Effective receptive field as in RepLKNet (Ding et al. 2022): (H, W) float64.

  For each image, the gradient of the centre position `(h // 2, w // 2)` of the
  stage's output, summed over its channels, with respect to the input image; the
  absolute value is summed over the colour channels and averaged over the images.
  Entry (y, x) is how much input pixel (y, x) moves the central feature.
  """
  stage = check_stage(module, variables, images, stage)

  @jax.jit
  def contributions(variables, images, valid):
    def centre(images):
      out = _stage_taps(module, variables, images)[stage]
      # Images do not interact at inference: the batch sum gives per-image gradients.
      return out[:, out.shape[1] // 2, out.shape[2] // 2, :].sum()
    per_image = jnp.abs(jax.grad(centre)(images)).sum(axis=3)
    return jnp.where(valid[:, None, None], per_image, 0.0).sum(axis=0)

  total = 0.0
  for chunk, n in _batched(images, batch_size):
    valid = jnp.arange(len(chunk)) < n
    total += np.asarray(contributions(variables, chunk, valid), np.float64)
  return total / len(images)


def area_ratio(contributions, threshold):
  """RepLKNet's high-contribution area ratio: the area, as a fraction of the image, of
  the smallest square centred on pixel (H // 2, W // 2) that holds more than
  `threshold` of the total (clipped at the image border)."""
  contributions = np.asarray(contributions, np.float64)
  h, w = contributions.shape
  total = contributions.sum()
  for r in range(max(h, w)):
    window = contributions[max(h // 2 - r, 0):h // 2 + r + 1,
                           max(w // 2 - r, 0):w // 2 + r + 1]
    if window.sum() > threshold * total:
      return window.size / (h * w)
  return 1.0


def erf_summary(contributions):
  """Area ratios at `THRESHOLDS`: of the map itself ("raw") and of `log1p(map)`, the
  one RepLKNet reports (its log10(1 + x) / max has the same ratios)."""
  log = np.log1p(contributions)
  return {"area_ratio_raw": {str(t): area_ratio(contributions, t) for t in THRESHOLDS},
          "area_ratio_log": {str(t): area_ratio(log, t) for t in THRESHOLDS}}


def erf_image(contributions):
  """What the figure shows: log1p, then min-max normalised to [0, 1]."""
  log = np.log1p(contributions)
  span = log.max() - log.min()
  return (log - log.min()) / span if span > 0 else np.zeros_like(log)


def plot_erf(maps, stages, path):
  fig = Figure(figsize=(4 * len(maps), 3.6), layout="constrained")
  for ax, (label, contributions) in zip(fig.subplots(1, len(maps), squeeze=False)[0],
                                        maps.items()):
    ratios = erf_summary(contributions)["area_ratio_log"]
    shown = ax.imshow(erf_image(contributions), cmap="RdYlGn_r", vmin=0, vmax=1)
    ax.set_title(f"{label}\nstage {stages[label]}: r(20%)={ratios['0.2']:.3f} "
                 f"r(50%)={ratios['0.5']:.3f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(shown, ax=fig.axes, shrink=0.8, label="log1p, min-max normalised")
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- features (Fig. 5)


def stage_features(module, variables, images, batch_size=16):
  """Every stage's output on `images`: a list of float32 numpy arrays (N, h, w, C)."""
  taps = jax.jit(functools.partial(_stage_taps, module))
  chunks = [[np.asarray(f[:n]) for f in taps(variables, chunk)]
            for chunk, n in _batched(images, batch_size)]
  return [np.concatenate(per_stage) for per_stage in zip(*chunks)]


def feature_stats(features):
  """Mean, standard deviation, extremes and `QUANTILES` of all the values (float64)."""
  x = np.asarray(features, np.float64).ravel()
  return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
          "max": float(x.max()),
          "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(x, QUANTILES))}}


def feature_distance(features, reference):
  """How far `features` are from `reference` features.

  `wasserstein`: the 1-Wasserstein distance between the two value distributions (mean
  absolute difference of 1000 evenly spaced quantiles), for any shapes; for tensors of
  the same shape (the same images through a student and a teacher of the same
  widths), also `relative_l2` = ||a - b|| / ||b|| and the `cosine` of the flattened
  tensors.
  """
  a = np.asarray(features, np.float64)
  b = np.asarray(reference, np.float64)
  distance = {"wasserstein": float(np.mean(np.abs(
      np.quantile(a, _W1_LEVELS) - np.quantile(b, _W1_LEVELS))))}
  if a.shape == b.shape:
    a, b = a.ravel(), b.ravel()
    distance["relative_l2"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    distance["cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
  return distance


def histograms(features_by_label):
  """Per stage, density histograms of every model's values on shared bins spanning the
  0.1% to 99.9% quantiles: {label: [(density, edges) per stage]}."""
  num_stages = len(next(iter(features_by_label.values())))
  result = {label: [] for label in features_by_label}
  for i in range(num_stages):
    values = [np.asarray(f[i], np.float64).ravel() for f in features_by_label.values()]
    lo = min(np.quantile(v, QUANTILES[0]) for v in values)
    hi = max(max(np.quantile(v, QUANTILES[-1]) for v in values), lo + 1e-6)  # constants
    edges = np.linspace(lo, hi, _HIST_BINS + 1)
    for label, v in zip(features_by_label, values):
      result[label].append((np.histogram(v, bins=edges, density=True)[0], edges))
  return result


def plot_features(hists, path):
  num_stages = len(next(iter(hists.values())))
  fig = Figure(figsize=(3.6 * num_stages, 3), layout="constrained")
  axes = fig.subplots(1, num_stages, squeeze=False)[0]
  for label, per_stage in hists.items():
    for i, (ax, (density, edges)) in enumerate(zip(axes, per_stage)):
      ax.stairs(density, edges, label=label)
      ax.set_title(f"stage {i} output", fontsize=9)
      ax.set_yscale("log")
  axes[0].set_ylabel("density")
  axes[-1].legend(fontsize=8)
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- affine (Fig. 6)


def _block_key(path):
  return [int(n) for n in re.findall(r"\d+", path)]


def affine_scales(params):
  """RIFormer's affine token mixers: {"stages_i/blocks_j": {"scale", "bias",
  "effective_scale"}}, per-channel float32 numpy arrays, blocks in order.

  The mixer computes `scale * x + bias - x` (it subtracts its input like PoolFormer's
  `pool(x) - x`), so its branch multiplies channel c by `effective_scale = scale - 1`,
  the factor `reparameterize` folds into norm1's scale. A mixer that adds nothing has
  scale 1; one that cancels its input (the init, scale ~ 0) has effective scale -1.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  blocks = {}
  for path, value in flat.items():
    if path.endswith("/token_mixer/scale") and path[:-len("scale")] + "bias" in flat:
      block = path[:-len("/token_mixer/scale")]
      scale = np.asarray(value, np.float32)
      blocks[block] = {"scale": scale,
                       "bias": np.asarray(flat[block + "/token_mixer/bias"], np.float32),
                       "effective_scale": scale - np.float32(1)}
  if not blocks:
    if any(path.endswith("norm_reparam/scale") for path in flat):
      raise ValueError("these are deploy-form params: the affine mixers are folded into "
                       "norm_reparam and cannot be recovered; use the training-time "
                       "weights (train.py's workdir/student)")
    raise ValueError("no affine token mixer (token_mixer/{scale,bias}) in these params; "
                     "only RIFormer (token_mixer='affine') has one, not PoolFormer, "
                     "IdentityFormer or the teachers")
  return dict(sorted(blocks.items(), key=lambda item: _block_key(item[0])))


def affine_stats(values):
  """Channel count and statistics of one block's effective scales."""
  e = np.asarray(values["effective_scale"], np.float64)
  return {"channels": len(e), "mean": float(e.mean()), "std": float(e.std()),
          "min": float(e.min()), "max": float(e.max()), "mean_abs": float(np.abs(e).mean())}


def _by_stage(scales):
  stages = {}
  for block, values in scales.items():
    stages.setdefault(block.split("/")[0], []).append(values["effective_scale"])
  return {stage: np.stack(rows) for stage, rows in stages.items()}


def _channel_grid(values):
  """Channels as a near-square grid (NaN-padded), like the paper's per-block maps."""
  cols = math.ceil(math.sqrt(len(values)))
  grid = np.full(cols * math.ceil(len(values) / cols), np.nan, np.float32)
  grid[:len(values)] = values
  return grid.reshape(-1, cols)


def plot_affine(scales_by_label, path):
  """Effective scales, blocks x channels, one panel per model and stage."""
  by_stage = {label: _by_stage(s) for label, s in scales_by_label.items()}
  limit = max(np.abs(m).max() for stages in by_stage.values() for m in stages.values())
  num_stages = max(len(stages) for stages in by_stage.values())
  fig = Figure(figsize=(3.6 * num_stages, 1.2 + 1.6 * len(by_stage)), layout="constrained")
  axes = fig.subplots(len(by_stage), num_stages, squeeze=False)
  for row, (label, stages) in zip(axes, by_stage.items()):
    for ax, (stage, matrix) in zip(row, stages.items()):
      shown = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                        interpolation="nearest")
      ax.set_title(f"{label}: {stage}", fontsize=9)
      ax.set_yticks(range(len(matrix)))
      ax.set_xlabel("channel", fontsize=8)
      ax.set_ylabel("block", fontsize=8)
  fig.colorbar(shown, ax=fig.axes, label="effective scale (scale - 1)")
  fig.savefig(path, dpi=120)


def plot_affine_blocks(scales_by_label, blocks, path):
  """Effective scales of chosen blocks as channel grids (the paper's Fig. 6)."""
  limit = max(np.abs(s[b]["effective_scale"]).max()
              for s in scales_by_label.values() for b in blocks)
  fig = Figure(figsize=(2.8 * len(blocks) + 1, 0.4 + 2.6 * len(scales_by_label)),
               layout="constrained")
  axes = fig.subplots(len(scales_by_label), len(blocks), squeeze=False)
  for row, (label, scales) in zip(axes, scales_by_label.items()):
    for ax, block in zip(row, blocks):
      shown = ax.imshow(_channel_grid(scales[block]["effective_scale"]), cmap="RdBu_r",
                        vmin=-limit, vmax=limit, interpolation="nearest")
      ax.set_title(f"{label}: {block}", fontsize=9)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.colorbar(shown, ax=fig.axes, label="effective scale (scale - 1)")
  fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- command line


def _labels(directories, labels):
  """The given labels, or each directory's shortest path suffix that tells them apart."""
  if labels:
    if len(labels) != len(directories):
      raise ValueError(f"{len(labels)} --labels for {len(directories)} --models")
    if len(set(labels)) != len(labels):
      raise ValueError(f"--labels must differ: {labels}")
    return labels
  parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in directories]
  for k in range(1, max(map(len, parts)) + 1):
    suffixes = ["/".join(p[-k:]) for p in parts]
    if len(set(suffixes)) == len(suffixes):
      return suffixes
  raise ValueError(f"--models lists the same directory twice: {directories}")


def _load(directory):
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such model directory")
  return pretrained.load_pretrained(directory)


def _models(args):
  """{label: (directory, module, variables)} in the order given."""
  return {label: (d, *_load(d)) for label, d in
          zip(_labels(args.models, args.labels), args.models)}


def _images(args):
  return load_images(args.dataset, args.split, args.num_images, args.resolution,
                     args.data_dir, args.crop_pct)


def _write_json(path, data):
  with open(path, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")


def _data_info(args, images):
  return {"dataset": args.dataset, "split": args.split, "num_images": len(images),
          "resolution": list(images.shape[1:3])}


def run_erf(args):
  models, images = _models(args), _images(args)
  maps, summary = {}, {}
  for label, (directory, module, variables) in models.items():
    try:
      stage = check_stage(module, variables, images, args.stage)
    except ValueError as e:
      raise ValueError(f"{directory}: {e}") from e
    maps[label] = erf_map(module, variables, images, stage, args.batch_size)
    summary[label] = {"model": directory, "stage": stage, **erf_summary(maps[label])}
  np.savez(os.path.join(args.out, "erf.npz"), **maps)
  _write_json(os.path.join(args.out, "erf.json"),
              {**_data_info(args, images), "models": summary})
  plot_erf(maps, {label: s["stage"] for label, s in summary.items()},
           os.path.join(args.out, "erf.png"))
  for label, numbers in summary.items():
    ratios = " ".join(f"{float(t):.0%}:{r:.4f}" for t, r in numbers["area_ratio_log"].items())
    print(f"{label} (stage {numbers['stage']}): area ratio of the log map {ratios}")


def run_features(args):
  models = _models(args)
  reference = args.reference or next(iter(models))
  if reference not in models:
    raise ValueError(f"--reference {reference!r} is none of the labels {list(models)}")
  images = _images(args)
  features = {label: stage_features(module, variables, images, args.batch_size)
              for label, (_, module, variables) in models.items()}
  summary = {}
  for label, per_stage in features.items():
    summary[label] = {"model": models[label][0], "stages": [
        {"shape": list(f.shape), **feature_stats(f)} for f in per_stage]}
    if label != reference:
      if len(per_stage) != len(features[reference]):
        raise ValueError(f"{label} has {len(per_stage)} stages and {reference} "
                         f"{len(features[reference])}; they cannot be compared")
      summary[label]["distance_to_reference"] = [
          feature_distance(f, r) for f, r in zip(per_stage, features[reference])]
  hists = histograms(features)
  arrays = {}
  for label, per_stage in hists.items():
    for i, (density, edges) in enumerate(per_stage):
      arrays[f"{label}:stage_{i}:density"], arrays[f"stage_{i}:edges"] = density, edges
  np.savez(os.path.join(args.out, "features.npz"), **arrays)
  _write_json(os.path.join(args.out, "features.json"),
              {**_data_info(args, images), "reference": reference, "models": summary})
  plot_features(hists, os.path.join(args.out, "features.png"))
  for label, numbers in summary.items():
    for i, distance in enumerate(numbers.get("distance_to_reference", [])):
      shown = ", ".join(f"{k}={v:.4g}" for k, v in distance.items())
      print(f"{label} vs {reference}, stage {i}: {shown}")


def _parse_blocks(specs):
  blocks = []
  for spec in specs:
    if not re.fullmatch(r"\d+/\d+", spec):
      raise ValueError(f"--blocks {spec!r}: expected STAGE/BLOCK, e.g. 2/5 for "
                       "stages_2/blocks_5 (counted from 0)")
    stage, block = spec.split("/")
    blocks.append(f"stages_{stage}/blocks_{block}")
  return blocks


def run_affine(args):
  blocks = _parse_blocks(args.blocks)
  scales = {}
  for label, directory in zip(_labels(args.models, args.labels), args.models):
    _, variables = _load(directory)
    try:
      scales[label] = affine_scales(variables["params"])
    except ValueError as e:
      name = store.read_manifest(directory)["model"]
      raise ValueError(f"{directory} ({name}): {e}") from e
    missing = [b for b in blocks if b not in scales[label]]
    if missing:
      raise ValueError(f"{directory}: no block {', '.join(missing)}; it has "
                       f"{', '.join(scales[label])}")
  np.savez(os.path.join(args.out, "affine.npz"),
           **{f"{label}:{block}:{k}": v for label, s in scales.items()
              for block, values in s.items() for k, v in values.items()})
  summary = {label: {"model": directory,
                     "blocks": {block: affine_stats(v) for block, v in s.items()}}
             for (label, s), directory in zip(scales.items(), args.models)}
  _write_json(os.path.join(args.out, "affine.json"), summary)
  plot_affine(scales, os.path.join(args.out, "affine.png"))
  if blocks:
    plot_affine_blocks(scales, blocks, os.path.join(args.out, "affine_blocks.png"))
  for label, numbers in summary.items():
    print(f"{label}: mean |scale - 1| per block " + " ".join(
        f"{v['mean_abs']:.3f}" for v in numbers["blocks"].values()))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="python -m riformer_jax.analysis",
                                   description=__doc__.split("\n")[0])
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--models", nargs="+", required=True,
                      help="directories that load_pretrained reads")
  common.add_argument("--labels", nargs="+", help="one per model (default: from the paths)")
  common.add_argument("--out", required=True, help="output directory")
  data = argparse.ArgumentParser(add_help=False)
  data.add_argument("--dataset", default="synthetic",
                    help="synthetic, folder or a TFDS name (sources.get_source)")
  data.add_argument("--split", default="test")
  data.add_argument("--data_dir", default=None)
  data.add_argument("--num_images", type=int, default=50)
  data.add_argument("--resolution", type=int, default=None,
                    help="default: 96 for the synthetic set, else 224")
  data.add_argument("--crop_pct", type=float, default=None,
                    help="eval resize-and-crop; 0: no resize (default for synthetic), "
                    "else 0.9")
  data.add_argument("--batch_size", type=int, default=16)
  commands = parser.add_subparsers(dest="command", required=True)
  erf = commands.add_parser("erf", parents=[common, data],
                            help="effective receptive fields (Fig. 4)")
  erf.add_argument("--stage", type=int, default=-1,
                   help="stage whose central output is traced (0-based; -1: the last)")
  erf.set_defaults(run=run_erf)
  features = commands.add_parser("features", parents=[common, data],
                                 help="distributions of the stage outputs (Fig. 5)")
  features.add_argument("--reference", default=None,
                        help="label the others are compared with (default: the first)")
  features.set_defaults(run=run_features)
  affine = commands.add_parser("affine", parents=[common],
                               help="scales of RIFormer's affine mixers (Fig. 6)")
  affine.add_argument("--blocks", nargs="*", default=[],
                      help="also draw these blocks as channel grids, as STAGE/BLOCK")
  affine.set_defaults(run=run_affine)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  try:
    os.makedirs(args.out, exist_ok=True)
    args.run(args)
  except (OSError, ValueError) as e:
    print(f"analysis {args.command}: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.command} results to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
