"""Where an edge runtime's time goes: OpenVINO's own per-node profile of exported files,
summed by operation and by the kernel OpenVINO chose for it.

    python -m riformer_jax.bench.edge_ops --artifacts DIR/riformer_b1 DIR/poolformer_b1 \\
        [--int8] [--threads 2] [--calls 20]

PREFIX as `riformer_jax.deploy.export` (or `bench.edge --workdir DIR`) wrote it; with
`--int8` PREFIX_int8.xml too. Each file is compiled for float32 (as `bench.edge`'s
float32 rows) with OpenVINO's `PERF_COUNT`, run `--calls` times at its own batch after a
warm-up, and each node's `real_time` summed: one table of milliseconds per call by
operation type (Convolution, MVN, Reorder, FakeQuantize, ...) with one column per file,
then the kernels (`exec_type`: e.g. brgconv_avx2_f32 or an `_I8` kernel), which say
what the CPU's instruction set gave each operation. The profiler's sum is not a
call's wall time (the nodes it does not time, the threads' joins): it says where the
time goes, `bench.edge` how long a call takes.
"""

import argparse
import collections
import os
import sys

import numpy as np

from riformer_jax.bench import edge as bench_edge


def profile(xml_path, threads=None, calls=20):
  """`({node type: ms per call}, {(node type, kernel): ms per call})` of `xml_path`."""
  import openvino as ov  # noqa: PLC0415

  config = {"PERF_COUNT": "YES", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"}
  if threads:
    config["INFERENCE_NUM_THREADS"] = threads
  compiled = ov.Core().compile_model(xml_path, "CPU", config)
  request = compiled.create_infer_request()
  shape = [int(d) for d in compiled.input(0).get_partial_shape().to_shape()]
  images = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  request.infer({0: images})  # warm-up
  by_type, by_kernel = collections.Counter(), collections.Counter()
  for _ in range(calls):
    request.infer({0: images})
    for node in request.profiling_info:
      ms = node.real_time.total_seconds() * 1e3
      if ms > 0:
        by_type[node.node_type] += ms / calls
        by_kernel[node.node_type, node.exec_type] += ms / calls
  return dict(by_type), dict(by_kernel)


def table(columns, rows_of, header):
  """Markdown: one row per key (largest first in the first column), one column per
  file, each cell `ms (share of its file's total)`."""
  keys = sorted({k for column in columns.values() for k in rows_of(column)},
                key=lambda k: -rows_of(next(iter(columns.values()))).get(k, 0.0))
  totals = {name: sum(rows_of(column).values()) for name, column in columns.items()}
  lines = [f"| {header} | " + " | ".join(columns) + " |",
           "|---|" + "---:|" * len(columns)]
  for key in keys:
    label = " / ".join(key) if isinstance(key, tuple) else key
    cells = []
    for name, column in columns.items():
      ms = rows_of(column).get(key, 0.0)
      cells.append(f"{ms:.2f} ({100 * ms / totals[name]:.0f}%)" if ms else "")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines.append("| total (profiled nodes) | " + " | ".join(
      f"{totals[name]:.2f}" for name in columns) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--artifacts", nargs="+", required=True,
                      help="PREFIXes of exported files (PREFIX.xml)")
  parser.add_argument("--int8", action="store_true", help="also PREFIX_int8.xml")
  parser.add_argument("--threads", type=int, default=None)
  parser.add_argument("--calls", type=int, default=20)
  args = parser.parse_args(argv)
  paths = [p + suffix for p in args.artifacts
           for suffix in ((".xml", "_int8.xml") if args.int8 else (".xml",))]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    sys.exit(f"edge_ops: {', '.join(missing)}: no such file (export it first)")
  columns = {os.path.basename(p)[:-len(".xml")]: profile(p, args.threads, args.calls)
             for p in paths}
  print(f"{bench_edge.cpu_name()} ({bench_edge.cpu_isa()}), OpenVINO CPU, "
        f"{args.threads or 'default'} thread(s), ms per call, mean of {args.calls}")
  print(table(columns, lambda c: c[0], "operation"))
  print()
  print(table(columns, lambda c: c[1], "operation / kernel"))


if __name__ == "__main__":
  main()
