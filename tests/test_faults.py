"""faults: the device-side non-finite watch, config comparison, override messages."""

import logging
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from riformer_jax.train import faults

NAMES = ("loss/total", "loss/ce", "grad_norm")


def metrics(total=1.0, ce=1.0, grad_norm=1.0):
  return {"loss/total": jnp.float32(total), "loss/ce": jnp.float32(ce),
          "grad_norm": jnp.float32(grad_norm)}


def test_the_watch_keeps_the_first_non_finite_step_and_its_terms():
  watch = faults.NonFiniteWatch(NAMES)
  update = jax.jit(watch.update)
  health = watch.init()
  for step in (1, 2):
    health = update(health, metrics(), step)
  watch.check(health)  # all finite so far: no error
  health = update(health, metrics(total=np.nan, grad_norm=np.inf), 3)
  health = update(health, metrics(ce=np.nan), 4)  # later ones do not overwrite it
  with pytest.raises(faults.RunError,
                     match=r"non-finite loss/total, grad_norm at step 3: .* up to step 2 "
                           r"are kept") as error:
    watch.check(health, last_saved=2)
  assert "loss/ce" not in str(error.value)


def test_the_watch_refuses_non_finite_parameters():
  watch = faults.NonFiniteWatch(NAMES)
  assert bool(faults.all_finite({"a": jnp.ones(3), "b": jnp.zeros((2, 2))}))
  params = {"a": jnp.ones(3), "b": jnp.zeros((2, 2)).at[1, 0].set(jnp.inf)}
  finite = bool(jax.jit(faults.all_finite)(params))
  assert not finite
  with pytest.raises(faults.RunError, match="no checkpoint was written"):
    watch.check(watch.init(), params_finite=finite)


def test_compare_configs_splits_refused_and_harmless_changes():
  recorded = {"batch_size": 32, "log_every_steps": 10, "lr": 1e-3,
              "model": {"dims": [8, 16]}, "data": {"data_dir": "/a", "dataset": "x"}}
  current = {"batch_size": 32, "log_every_steps": 5, "lr": 1e-3,
             "model": {"dims": (8, 32)}, "data": {"data_dir": "/b", "dataset": "x"},
             "profile_steps": (0, 0)}
  refused, accepted = faults.compare_configs(recorded, current)
  assert refused == ["model.dims: (8, 16) -> (8, 32)"]  # a JSON list equals a tuple
  assert accepted == ["data.data_dir: '/a' -> '/b'", "log_every_steps: 10 -> 5",
                      "profile_steps: '(absent)' -> (0, 0)"]
  assert faults.compare_configs(recorded, recorded) == ([], [])


def test_unknown_field_message_names_the_flag_and_the_suggestion():
  config = ml_collections.ConfigDict({"model": {"dims": (1, 2)}, "batch_size": 3})
  with pytest.raises(AttributeError) as error:
    config.model.dimz  # noqa: B018 (what ml_collections raises for the override)
  message = faults.unknown_field_message(error.value, ["train.py", "--config.model.dimz=1"])
  assert message == "--config.model.dimz: no such config field; did you mean " \
      "--config.model.dims?"


def test_tuple_overrides_are_checked_element_by_element():
  defaults = ml_collections.ConfigDict({"model": {"dims": (8, 16)}, "scale": (0.5, 1.0),
                                        "name": "x"})
  faults.check_override_types(defaults, {"model.dims": (4, 8, 12), "scale": (1, 1.0),
                                         "name": "y"})
  with pytest.raises(faults.RunError, match=r"--config.model.dims=\('abc',\): expected "
                                            r"a tuple of int like \(8, 16\)"):
    faults.check_override_types(defaults, {"model.dims": ("abc",)})
  with pytest.raises(faults.RunError, match="scale"):
    faults.check_override_types(defaults, {"scale": (0.5, "1")})


def test_only_the_abandoned_reads_of_a_failed_restore_are_silenced():
  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = seen.append
  try:
    faults.quiet_abandoned_reads()
    faults.quiet_abandoned_reads()  # installed once
    for error in (RuntimeError("Event loop is closed"), RuntimeError("other"),
                  ValueError("Event loop is closed")):
      sys.unraisablehook(types.SimpleNamespace(exc_value=error))
  finally:
    sys.unraisablehook = previous
  assert [str(u.exc_value) for u in seen] == ["other", "Event loop is closed"]
  assert isinstance(seen[1].exc_value, ValueError)
  asyncio_logger = logging.getLogger("asyncio")
  try:
    assert not asyncio_logger.filter(logging.makeLogRecord(
        {"msg": "Task exception was never retrieved\nfuture: <Task ...>"}))
    assert asyncio_logger.filter(logging.makeLogRecord({"msg": "Executing <Task> took"}))
  finally:
    asyncio_logger.filters.clear()


def test_out_of_memory_advice_names_only_what_the_config_has_not_done():
  error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 bytes.")
  config = ml_collections.ConfigDict(dict(
      model_name="riformer_s12", resolution=224, batch_size=512, accum_steps=1,
      remat=False, fsdp=False, compute_dtype="float32"))
  plain = faults.out_of_memory_message(config, "in the train step", error)
  for field in ("config.accum_steps=2", "config.remat=True", "config.fsdp=True",
                "config.compute_dtype='bfloat16'"):
    assert field in plain
  config.update(remat=True, fsdp=True, compute_dtype="bfloat16", accum_steps=2)
  done = faults.out_of_memory_message(config, "in the train step", error)
  assert "config.accum_steps=4" in done and "allocate 8 bytes" in done
  for field in ("config.remat=True", "config.fsdp=True", "config.compute_dtype="):
    assert field not in done.split("What gives memory back")[1]
