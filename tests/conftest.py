"""Eight simulated CPU devices for every test, set before JAX initialises, and one
persistent compilation cache for the session: the tests build the same tiny models again and
again (and in subprocesses), and a cached executable loads in milliseconds where compiling
takes seconds. The cache is new for every session, so nothing compiled elsewhere is reused.
The tests check results, not speed, and compiling dominates their time, so XLA's CPU backend
skips its LLVM optimisations (HLO passes, fusion and buffer assignment still run): the
suite takes 15 % less time."""
import functools
import os
import tempfile

UNOPTIMISED_CPU = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count=8 {UNOPTIMISED_CPU}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# In the environment, so that pytest-xdist workers and the processes tests start share it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxlm-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def one_device_env() -> dict:
  """The environment for a process a test starts with one CPU device, as on a GPU host."""
  return dict(os.environ, XLA_FLAGS=UNOPTIMISED_CPU)


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory):
  """One tokenization of the embedded corpus shared by the whole session."""
  return str(tmp_path_factory.mktemp("token_cache"))


def make_tiny_config(token_cache: str, **overrides):
  """A tiny, fast, fp32 training config; overrides as a__b=value for key a.b."""
  from jaxlm.config import apply_overrides, base_config
  config = base_config()
  apply_overrides(config, {
      "model.preset": "tiny", "model.vocab_size": 4096, "model.compute_dtype": "float32",
      "data.seq_len": 32, "data.batch_size": 8, "data.cache_dir": token_cache,
      "optim.learning_rate": 1e-3, "optim.warmup_steps": 2, "train.steps": 6,
      "train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 3,
      "checkpoint.async_save": False,
      **{k.replace("__", "."): v for k, v in overrides.items()}})
  return config


@pytest.fixture
def tiny_config(token_cache):
  """A factory for make_tiny_config on the session's token cache."""
  return functools.partial(make_tiny_config, token_cache)
