"""riformer_jax.bench.edge: its table and target ratios; the whole run behind `slow`."""

import json

import numpy as np
import pytest

import riformer_jax
from riformer_jax.bench import edge as bench_edge
from riformer_jax.bench import edge_ops
from riformer_jax.deploy import export
from riformer_jax.weights import store

from conftest import random_params


def row(model, runtime, precision, threads, batch, ms, source="riformer_jax"):
  return dict(model=model, runtime=runtime, precision=precision, threads=threads,
              batch=batch, source=source, p50_ms=ms, p90_ms=1.1 * ms,
              images_per_s=1e3 * batch / ms, calls=5)


RESULTS = [
    row("RIFormer (deploy)", "PyTorch eager", "float32", 1, 1, 60.0, "MMPreTrain"),
    row("RIFormer (deploy)", "PyTorch compile", "float32", 1, 1, 40.0, "MMPreTrain"),
    row("RIFormer (deploy)", "PyTorch compile", "float32", 1, 16, 400.0, "MMPreTrain"),
    row("PoolFormer", "PyTorch eager", "float32", 1, 1, 50.0, "timm"),
    row("RIFormer (deploy)", "openvino", "float32", 1, 1, 20.0),
    row("RIFormer (deploy)", "openvino", "float32", 1, 16, 250.0),
    row("RIFormer (fused)", "onnxruntime", "int8", 1, 1, 10.0),
    row("RIFormer (deploy)", "onnxruntime", "int8", 1, 1, 12.0),
    row("PoolFormer", "openvino", "float32", 1, 1, 25.0),
    row("PoolFormer", "onnxruntime", "float32", 1, 1, 22.0),
    row("PoolFormer-S9", "openvino", "float32", 1, 1, 19.0),
    row("PoolFormer-XS12", "openvino", "float32", 1, 1, 21.0),
]


def test_the_table_compares_each_row_with_the_fastest_pytorch_of_its_model():
  lines = bench_edge.table(RESULTS).splitlines()
  openvino = next(line for line in lines
                  if "| RIFormer (deploy) | riformer_jax | openvino | float32" in line)
  # 40 ms (torch.compile) over 20 ms; batch 16 at 250 ms is 64 images/s.
  assert "| 20.0 | 22.0 | 2.00x | 64.0 |" in openvino
  pool = next(line for line in lines
              if "| PoolFormer | riformer_jax | openvino | float32" in line)
  assert "2.00x" in pool  # against timm's PoolFormer (50 ms), not RIFormer's
  slim = next(line for line in lines if "| PoolFormer-S9 |" in line)
  assert "| 19.0 | 20.9 | 2.63x |" in slim  # Table 8's: against timm's PoolFormer too


def test_a_batch_1_table_has_no_throughput_column():
  lines = bench_edge.table(RESULTS, batches=(1,)).splitlines()
  assert lines[0].endswith("| vs best PyTorch |") and lines[1].count("---") == 8
  openvino = next(line for line in lines
                  if "| RIFormer (deploy) | riformer_jax | openvino | float32" in line)
  assert openvino.endswith("| 20.0 | 22.0 | 2.00x |")


def test_the_targets_name_the_best_artifacts_and_their_ratios():
  line, table8 = bench_edge.targets(RESULTS).splitlines()
  assert "fastest PyTorch RIFormer 40.0 ms (PyTorch compile)" in line
  assert "best float32 artifact RIFormer (deploy) in openvino 20.0 ms = 2.00x" in line
  assert "best int8 RIFormer (fused) in onnxruntime 10.0 ms = 4.00x" in line
  # PoolFormer in the runtime of the best float32 RIFormer: 25 / 20.
  assert "PoolFormer in openvino 25.0 ms, RIFormer 1.25x faster" in line
  # Table 8 where the deploy form is fastest among the runtimes the slimmed ones run in.
  assert table8 == ("1 thread(s), Table 8 in openvino: RIFormer (deploy) 20.0 ms, "
                    "PoolFormer-S9 19.0 ms, PoolFormer-XS12 21.0 ms, PoolFormer 25.0 ms")


def test_the_instruction_sets_come_from_cpuinfo():
  x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16\n"
  assert bench_edge.isa_from_cpuinfo(x86) == "AVX2, AVX-512, AVX-512 VNNI, AVX-512 BF16"
  laptop = "flags\t\t: fpu sse avx2 fma\n"
  assert bench_edge.isa_from_cpuinfo(laptop) == "AVX2"
  arm = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n"
  assert bench_edge.isa_from_cpuinfo(arm) == "NEON, NEON dot product, I8MM"
  assert bench_edge.isa_from_cpuinfo("model name : x\n") == "unknown"
  assert bench_edge.isa_from_cpuinfo("flags : fpu sse2\n").startswith("none of AVX2")


@pytest.mark.slow
def test_a_small_run_times_every_runtime_and_writes_json(tmp_path, capsys):
  path = tmp_path / "edge.json"
  # 64 px: at 32 (a 1x1 last stage) and batch 1, TFLiteConverter 2.21 fails on a
  # batch_matmul of rank 4 inside the MLP's dense layers.
  bench_edge.main(["--resolution", "64", "--threads", "1", "--rounds", "1",
                   "--calls", "1,1", "--large_batch", "2", "--calibration_images", "2",
                   "--workdir", str(tmp_path / "work"), "--json", str(path)])
  report = json.loads(path.read_text())
  rows = report["rows"]
  assert report["isa"] == bench_edge.cpu_isa() != "unknown"
  runtimes = {(r["runtime"], r["precision"]) for r in rows}
  assert {("xla", "float32"), ("onnxruntime", "int8"), ("openvino", "int8"),
          ("litert", "float32"), ("litert", "int8"), ("PyTorch compile", "float32")
          } <= runtimes
  assert all(r["p50_ms"] > 0 and r["calls"] == 1 for r in rows)
  assert {r["model"] for r in rows if r["runtime"] == "openvino"} >= {
      "PoolFormer-S9", "PoolFormer-XS12"}
  assert "best int8" in capsys.readouterr().out


@pytest.mark.slow
def test_table8_rows_alone(tmp_path, capsys):
  path = tmp_path / "edge.json"
  bench_edge.main(["--table8", "--resolution", "64", "--threads", "1", "--rounds", "1",
                   "--calls", "1,1", "--large_batch", "2", "--workdir",
                   str(tmp_path / "work"), "--json", str(path)])
  rows = json.loads(path.read_text())["rows"]
  assert {(r["model"], r["runtime"]) for r in rows} == {
      (model, runtime) for model in ("RIFormer (deploy)", "PoolFormer", "PoolFormer-S9",
                                     "PoolFormer-XS12")
      for runtime in ("onnxruntime", "openvino")}
  assert "Table 8 in" in capsys.readouterr().out


def test_the_profile_table_gives_each_file_its_milliseconds_and_shares():
  columns = {"a": ({"Convolution": 3.0, "MVN": 1.0}, {}),
             "b": ({"Convolution": 1.0, "AvgPool": 1.0}, {})}
  lines = edge_ops.table(columns, lambda c: c[0], "operation").splitlines()
  assert lines[2] == "| Convolution | 3.00 (75%) | 1.00 (50%) |"  # largest in "a" first
  assert "| AvgPool |  | 1.00 (50%) |" in lines
  assert lines[-1] == "| total (profiled nodes) | 4.00 | 2.00 |"


@pytest.mark.heavy  # a real export and OpenVINO's profiler
def test_openvino_s_profile_of_an_int8_file_names_int8_kernels(tmp_path, capsys):
  model = riformer_jax.create_model("poolformer_s12", depths=(1, 1, 1, 1),
                                    dims=(8, 16, 24, 32), num_classes=10)
  params = random_params(model, np.zeros((1, 64, 64, 3), np.float32), 0)
  source = store.save_pretrained(tmp_path / "m", "poolformer_s12", dict(
      depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10), params,
      preprocessing=store.preprocessing_record(64, 0.875))
  prefix = str(tmp_path / "p")
  export.export(source, prefix, ("onnx", "openvino"), batch=1, int8=True,
                calibration_count=4, log=lambda _: None)
  by_type, by_kernel = edge_ops.profile(prefix + "_int8.xml", threads=1, calls=2)
  assert by_type["Convolution"] > 0 and by_type["AvgPool"] > 0
  assert any(kernel.endswith("I8") for (op, kernel) in by_kernel if op == "Convolution")
  float32 = edge_ops.profile(prefix + ".xml", threads=1, calls=2)[1]
  assert not any(kernel.endswith("I8") for _, kernel in float32)
  edge_ops.main(["--artifacts", prefix, "--int8", "--threads", "1", "--calls", "1"])
  out = capsys.readouterr().out
  assert "| p | p_int8 |" in out and "Convolution /" in out
