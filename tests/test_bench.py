"""The benchmark command (riformer_jax.bench.throughput): its rows, ratios, timing and FLOPs."""

import concurrent.futures
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import riformer_jax
from riformer_jax.bench import throughput
from riformer_jax.models import counting
from conftest import relative_error

TINY = {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32], "num_classes": 10}
FORMS = ("poolformer", "deploy", "fused", "poolformer_s9", "poolformer_xs12")


def run_bench(tmp_path, *options):
  path = tmp_path / "bench.json"
  throughput.main(["--batch", "4", "--resolution", "32", "--warmup", "1", "--iters", "2",
              "--repeats", "3", "--model-overrides", json.dumps(TINY),
              "--json", str(path), *options])
  return json.loads(path.read_text())


def torch_importable():
  try:
    import torch  # noqa: F401,PLC0415
  except ImportError:
    return False
  return True


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  # One run for every test of its output: each compile costs seconds on 2 cores.
  return run_bench(tmp_path_factory.mktemp("bench"),
                   "--forms", ",".join(FORMS), "--train-steps", "mi",
                   "--logit-teacher", "poolformer_s12", "--max-batch", "8",
                   "--torch-modes", "eager" if torch_importable() else "")


@pytest.mark.heavy  # a benchmark run: not in `make check`
def test_every_row_asked_for_is_there_and_timed(results):
  ours = [row for row in results["inference"] if row["framework"] == "jax"]
  assert {row["id"] for row in ours} == {f"jax/jit/float32/{form}/s12" for form in FORMS}
  # Table 8's slimmed PoolFormers under the shape override: half the third stage, and
  # 5/6 of each width; each does less work than the PoolFormer.
  flops = {row["form"]: row["analytic_flops"] for row in ours}
  assert flops["poolformer_s9"] < flops["poolformer"]
  assert flops["poolformer_xs12"] < flops["poolformer"]
  (training,) = results["training"]
  assert training["id"] == "jax/train/float32/mi/s12"
  assert training["teachers"] == ["poolformer_s12", "poolformer_s12"]
  for row in ours + [training]:
    assert len(row["times_s"]) == 3 and min(row["times_s"]) > 0, row["id"]
    assert row["images_per_s"] == pytest.approx(row["batch"] / statistics.median(
        row["times_s"]), rel=1e-12)
    assert row["xla_flops"] > 0 and row["xla_bytes"] > 0 and row["compile_s"] > 0
    assert row["mfu"] is None  # a CPU has no peak in the table: n/a, not invented
  # Student forward + backward, two teacher forwards, the relation matrices.
  forward = 2 * 4 * riformer_jax.count_macs(
      riformer_jax.create_model("riformer_s12", **TINY), 32)
  assert training["analytic_flops"] > 5 * forward
  # Doubling from batch 4 stops at the cap, for the paper's pair of forms.
  assert [(r["form"], r["max_batch"]) for r in results["max_batch"]] == [
      ("poolformer", 8), ("deploy", 8)]


@pytest.mark.heavy  # a benchmark run: not in `make check`
def test_ratios_are_ratios_of_the_measured_medians(results):
  rows = {row["id"]: row for row in results["inference"]}
  ratios = {r["name"]: r for r in results["ratios"]}
  expected = {"deploy / poolformer", "fused / deploy", "deploy / poolformer_s9",
              "poolformer_s9 / poolformer", "deploy / poolformer_xs12",
              "poolformer_xs12 / poolformer"}
  if torch_importable():
    expected |= {"torch eager float32: deploy / poolformer",
                 "jax deploy / fastest torch deploy",
                 "jax poolformer / fastest torch poolformer"}
  assert set(ratios) == expected
  for ratio in ratios.values():
    numerator, denominator = rows[ratio["numerator"]], rows[ratio["denominator"]]
    assert numerator["batch"] == denominator["batch"]
    assert ratio["value"] == pytest.approx(statistics.median(denominator["times_s"])
                                           / statistics.median(numerator["times_s"]))
  assert ratios["deploy / poolformer"]["numerator"] == "jax/jit/float32/deploy/s12"
  assert "| s12 | deploy / poolformer |" in throughput.tables(results)


@pytest.mark.heavy  # a benchmark run: not in `make check`
@pytest.mark.skipif(not torch_importable(), reason="needs torch (requirements-dev.txt)")
def test_torch_rows(results):
  rows = {row["id"]: row for row in results["inference"] if row["framework"] == "torch"}
  assert set(rows) == {"torch/eager/float32/deploy/s12",
                       "torch/eager/float32/poolformer/s12"}
  for row in rows.values():
    assert "error" not in row and len(row["times_s"]) == 3, row
  # Whether the two frameworks ran on equal threads is part of every result.
  assert results["torch_cpu_threads"] >= 1
  assert f"PyTorch on {results['torch_cpu_threads']} thread(s)" in throughput.tables(results)


def test_measure_waits_for_asynchronous_work():
  # Each call returns at once; its 20 ms of work finish on another thread, so a
  # timing that did not wait for the results would read about 0.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    thunk = (lambda: pool.submit(time.sleep, 0.02),
             lambda futures: [f.result() for f in futures])
    times = throughput.measure({"sleep": thunk}, warmup=1, iters=3, repeats=3)["sleep"]
  assert len(times) == 3
  assert 0.019 < statistics.median(times) < 0.2


@pytest.mark.parametrize("form", ["poolformer", "riformer", "deploy", "fused"])
def test_xla_flops_agree_with_the_analytic_count(form):
  # S12 widths, one block per stage, at 64 px. XLA also counts the elementwise work
  # (norms, GELU, residual adds) and skips kernel taps that fall on padding; at these
  # widths the two effects stay within 5% (at 224 px: +7% for the full S12).
  model = throughput._form_model(form, "s12", dict(depths=(1, 1, 1, 1), num_classes=10),
                            jnp.float32)
  params = counting.abstract_variables(model, 64)["params"]
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  _, fields = throughput.compile_and_analyse(
      jax.jit(lambda p, x: model.apply({"params": p}, x)), params, images)
  analytic = 2 * 2 * riformer_jax.count_macs(model, 64)
  assert abs(fields["xla_flops"] / analytic - 1) < 0.05


def test_relation_macs_of_the_default_imitation_blocks():
  model = riformer_jax.create_model("riformer_s12")
  blocks = ("stages_0/blocks_1", "stages_1/blocks_1", "stages_2/blocks_5",
            "stages_3/blocks_1")
  expected = 3136 ** 2 * 64 + 784 ** 2 * 128 + 196 ** 2 * 320 + 49 ** 2 * 512
  assert throughput.relation_macs(model, 224, blocks) == expected


def test_peaks_come_from_the_table_or_the_command_line():
  assert throughput.peaks("NVIDIA H100 80GB HBM3", "bfloat16") == (989.5e12, 3350e9)
  assert throughput.peaks("NVIDIA H200", "float32") == (494.5e12, 4800e9)  # TF32
  assert throughput.peaks("cpu", "float32") == (None, None)
  assert throughput.peaks("cpu", "float32", peak_tflops=2.0, peak_gbps=50.0) == (2e12, 50e9)


@pytest.mark.skipif(not torch_importable(), reason="needs torch (requirements-dev.txt)")
def test_the_pytorch_deploy_riformer_computes_our_deploy_function():
  from riformer_jax.bench import torch_models as bench_torch  # noqa: PLC0415 (needs torch)
  # Our deploy weights (randomised: layer scales of 1e-5 would hide the blocks) in
  # MMPreTrain's deploy RIFormer, as the benchmark loads them: the same logits.
  training_form = riformer_jax.create_model("riformer_s12", **TINY)
  rng = np.random.default_rng(0)
  params = riformer_jax.reparameterize(jax.tree.map(
      lambda leaf: rng.uniform(-0.25, 1.25, leaf.shape).astype(np.float32)
      if leaf.ndim == 1 else (rng.standard_normal(leaf.shape) / np.sqrt(
          np.prod(leaf.shape[:-1]))).astype(np.float32),
      counting.abstract_variables(training_form, 32)["params"]))
  ours = throughput._form_model("deploy", "s12", TINY, jnp.float32)
  theirs = bench_torch.load_params(bench_torch.riformer_deploy(
      TINY["depths"], TINY["dims"], TINY["num_classes"]), params)
  images = np.random.default_rng(0).standard_normal((2, 37, 45, 3), np.float32)
  assert relative_error(bench_torch.forward_nhwc(theirs, images),
                        jax.jit(ours.apply)({"params": params}, images)) < 1e-5


@pytest.mark.heavy  # compiles and times two batches: not in `make check`
def test_the_largest_batch_search_stops_at_the_first_failure(monkeypatch):
  # Out of memory cannot be provoked on a CPU with 24 GiB; a failing timing at batch
  # 16 stands in for it, where the GPU run would meet it (compile or execution).
  timed_batches = []

  def measure(thunks, *timing):
    ((forward, _),) = thunks.values()
    batch = forward.args[1].shape[0]
    timed_batches.append(batch)
    if batch >= 16:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")
    return {"run": [0.5]}

  monkeypatch.setattr(throughput, "measure", measure)
  args = throughput.parse_args(["--batch", "4", "--resolution", "32", "--forms", "deploy",
                           "--max-batch", "64", "--warmup", "0"])
  rate = {"id": "jax/jit/float32/deploy/s12", "images_per_s": 3.0}
  (found,) = throughput.max_batches(args, TINY, throughput.param_source(TINY, 32), [rate])
  assert timed_batches == [8, 16]
  assert found["max_batch"] == 8 and found["images_per_s"] == 8 / 0.5
  assert found["stopped"].startswith("batch 16: RESOURCE_EXHAUSTED")


@pytest.mark.slow  # a second benchmark run (the default suite keeps the float32 one)
def test_bfloat16_rows(tmp_path):
  # The accelerator setting's code path (bf16 compute, float32 params), run on a CPU.
  torch_modes = "eager" if torch_importable() else ""
  results = run_bench(tmp_path, "--dtype", "bfloat16", "--forms", "deploy,fused",
                      "--train-steps", "ce", "--repeats", "1", "--torch-modes",
                      torch_modes, "--torch-dtypes", "bfloat16")
  rows = results["inference"] + results["training"]
  assert {row["id"] for row in rows} == {
      "jax/jit/bfloat16/deploy/s12", "jax/jit/bfloat16/fused/s12",
      "jax/train/bfloat16/ce/s12"} | ({"torch/eager/bfloat16/deploy/s12",
                                        "torch/eager/bfloat16/poolformer/s12"}
                                       if torch_modes else set())
  for row in rows:
    assert "error" not in row and row["images_per_s"] > 0, row
  ratios = {r["name"] for r in results["ratios"]}
  assert "fused / deploy" in ratios
  assert ("jax deploy / fastest torch deploy" in ratios) == bool(torch_modes)


@pytest.mark.slow  # torch.compile of every layer: minutes on 2 cores
@pytest.mark.skipif(not torch_importable(), reason="needs torch (requirements-dev.txt)")
def test_layer_benchmark_times_the_same_functions_in_both_frameworks(tmp_path):
  from riformer_jax.bench import ops as bench_ops  # noqa: PLC0415 (needs torch)
  import torch  # noqa: PLC0415
  parts = bench_ops.deploy_parts("s12", batch=2, resolution=32)
  # S12 (depths 2, 2, 6, 2): the stem, 3 downsamplings, 6 parts per stage.
  assert len(parts) == 4 + 4 * 6
  assert sum(count for name, count, *_ in parts if name.endswith("block")) == 12
  rng = np.random.default_rng(0)
  for name, _, shape, (module, params, kwargs), theirs in parts:
    x = rng.standard_normal(shape, np.float32)
    ours = module.apply({"params": params} if params else {}, x, **kwargs)
    with torch.inference_mode():
      reference = theirs.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    assert relative_error(reference.numpy().transpose(0, 2, 3, 1), ours) < 1e-5, name

  path = tmp_path / "ops.json"
  bench_ops.main(["--batch", "2", "--resolution", "32", "--warmup", "0", "--iters", "1",
                  "--repeats", "1", "--json", str(path)])
  rows = json.loads(path.read_text())["rows"]
  assert [row["layer"] for row in rows] == [name for name, *_ in parts]
  for row in rows:
    assert min(row["jax_ms"], row["torch eager_ms"], row["torch compile_ms"]) > 0
