"""The 1.1B reference model of DESIGN.md's performance table on the embedded corpus:
seq 2048, global batch 8, AdamW, bf16 compute, fp32 params, FSDP over all devices.
For accelerators; `jaxlm plan --config ref_1b --mesh fsdp=8` shows what each device holds.
"""
from jaxlm.config import base_config


def get_config():
  config = base_config()
  config.model.preset = "ref-1.1b"
  # minimal, without running cuDNN's attention forward again in the backward (one
  # attention forward a layer instead of two, for 1 GiB more on one H100: README)
  config.model.remat_policy = "minimal_with_attention"
  config.data.seq_len = 2048
  config.data.batch_size = 8
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 200
  config.train.steps = 5000
  config.train.log_every = 20
  config.train.eval_every = 500
  config.checkpoint.every = 1000
  return config
