"""Load any model jaxlm understands — a Hugging Face directory, a jaxlm model directory, a
GGUF file or a hub id when online — and write jaxlm model directories and HF exports.

BERT / RoBERTa encoders load from their Hugging Face directories (and from training workdirs)
and export back to them; jaxlm model directories hold decoders only.

A jaxlm model directory holds jaxlm_model.json (the LlamaConfig, the family and the source
config.json), params/ (an Orbax checkpoint of the parameters) and the tokenizer files.
Writes go to a temporary sibling that is renamed into place only when complete, so a failed
conversion never leaves a partial directory at the destination.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.convert import hf as hf_io
from jaxlm.convert.errors import ConversionError
from jaxlm.convert.hf_config import family_for, label_names, model_fields, write_hf_config
from jaxlm.models import Llama, LlamaConfig
from jaxlm.models.factory import abstract_model, encoder_family, head_fields, is_encoder
from jaxlm.parallel.rules import LogicalRules, state_shardings

MODEL_FILE = "jaxlm_model.json"


@dataclasses.dataclass
class LoadedParams:
  cfg: LlamaConfig
  params: dict
  family: str
  hf_config: dict | None  # the source config.json, kept for round trips
  source: Path | None  # where tokenizer and generation files can be copied from
  tokenizer_file: str | None = None  # a training run's tokenizer.json ("embedded" or a path)
  labels: tuple[str, ...] | None = None  # a classifier's class names, in class order


def _with_dtype(cfg: LlamaConfig, dtype: str | None) -> LlamaConfig:
  """HF and GGUF sources load as float32 unless asked; jaxlm directories as stored."""
  dtype = dtype or cfg.param_dtype
  return cfg.replace(param_dtype=dtype, compute_dtype=dtype)


def param_shardings(cfg: LlamaConfig, rules: LogicalRules) -> dict:
  """NamedShardings of cfg's parameters (a pure dict) under logical rules on their mesh."""
  return state_shardings(rules, nnx.state(abstract_model(cfg)))


def shardings_for(cfg: LlamaConfig, mesh, rules=None):
  if mesh is None:
    return None
  return param_shardings(cfg, LogicalRules(mesh, *(() if rules is None else (rules,))))


def fetch_from_hub(repo_id: str) -> Path:
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id, allow_patterns=[
        "*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]))
  except Exception as e:  # offline, unknown repo, no permission: all need a local path
    raise ConversionError(
        f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, pass a "
        f"local model directory (config.json + *.safetensors).") from None


def resolve_source(path: str | Path) -> Path:
  local = Path(path).expanduser()
  if local.exists():
    return local
  text = str(path)
  if text.count("/") == 1 and not text.startswith((".", "/", "~")):
    return fetch_from_hub(text)
  raise FileNotFoundError(f"{path} does not exist (expected an HF model directory, a jaxlm "
                          f"model directory or a .gguf file).")


def workdir_task_config(workdir: Path, task: str | None = None):
  """The config of a workdir's run, or with task (of a multi-task run) that task's single-head
  config: a multi-task workdir holds one model per task."""
  config = config_lib.read_workdir_config(workdir)
  tasks = config_lib.task_names(config)
  if tasks and task is None:
    raise ConversionError(f"{workdir} trained several heads ({', '.join(tasks)}): name the "
                          f"task to load, e.g. --task {tasks[0]}.")
  if task is not None and not tasks:
    raise ConversionError(f"{workdir} trained one head, not tasks: load it without a task.")
  return config_lib.task_config(config, task) if tasks else config


def read_config(path: str | Path, task: str | None = None) -> tuple[LlamaConfig, str]:
  """The architecture of a model directory, workdir or GGUF file, without loading weights;
  task: the head of a multi-task workdir."""
  path = resolve_source(path)
  if config_lib.is_workdir(path):
    cfg = config_lib.model_config(workdir_task_config(path, task))
    return cfg, family_for(cfg)
  if task is not None:
    raise ConversionError(f"{path} is not a multi-task training workdir: load it without a "
                          f"task.")
  if path.suffix == ".gguf":
    from jaxlm.convert.gguf_import import read_gguf_config
    return read_gguf_config(path)
  if (path / MODEL_FILE).is_file():
    meta = json.loads((path / MODEL_FILE).read_text())
    return LlamaConfig(**meta["model"]), meta["family"]
  if _is_encoder_directory(path):
    from jaxlm.convert.bert_hf import read_bert_config
    cfg, family, _ = read_bert_config(path)
    return cfg, family
  if hf_io.is_hf_directory(path):
    cfg, family, _ = hf_io.read_hf_directory_config(path)
    return cfg, family
  raise ConversionError(f"{path} is neither a Hugging Face model directory (config.json + "
                        f"safetensors), a jaxlm model directory ({MODEL_FILE}) nor a .gguf file.")


def _is_encoder_directory(path: Path) -> bool:
  from jaxlm.convert.bert_weights import FAMILIES
  return hf_io.is_hf_directory(path) and json.loads(
      (path / "config.json").read_text())["model_type"] in FAMILIES


def model_family(cfg) -> str:
  return encoder_family(cfg) if is_encoder(cfg) else family_for(cfg)


def load_params(path: str | Path, *, cfg: LlamaConfig | None = None, mesh=None,
                shardings=None, dtype: str | None = None,
                task: str | None = None) -> LoadedParams:
  """cfg: the architecture to load into (default: the source's own, float32 or `dtype`).
  Weights are placed on `shardings`, or on those `mesh` implies, as they are read. task:
  which head of a multi-task workdir (its trunk with that head, a single-head model)."""
  path = resolve_source(path)
  source_cfg, family = read_config(path, task)
  cfg = cfg or _with_dtype(source_cfg, dtype)
  shardings = shardings if shardings is not None else shardings_for(cfg, mesh)
  if path.suffix == ".gguf":
    from jaxlm.convert.gguf_import import load_gguf_params
    return LoadedParams(cfg, load_gguf_params(path, cfg, shardings), family, None, path)
  if config_lib.is_workdir(path):
    return _load_workdir(path, cfg, shardings, task)
  if (path / MODEL_FILE).is_file():
    meta = json.loads((path / MODEL_FILE).read_text())
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, cfg.param_dtype,
                                                             sharding=sh),
                          hf_io.abstract_params(cfg),
                          shardings or shardings_for(cfg, _single_device_mesh()))
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore((path / "params").absolute(), target)
    labels = meta.get("labels")
    return LoadedParams(cfg, params, family, meta.get("hf_config"), path,
                        labels=tuple(labels) if labels else None)
  if _is_encoder_directory(path):
    return _load_encoder_directory(path, cfg, shardings)
  _, _, hf = hf_io.read_hf_directory_config(path)
  return LoadedParams(cfg, hf_io.load_hf_params(path, cfg, shardings), family, hf, path,
                      labels=label_names(hf))


def _load_encoder_directory(path: Path, cfg, shardings) -> LoadedParams:
  """An HF BERT / RoBERTa directory into cfg: its own architecture and heads, in cfg's
  parameter dtype."""
  from jaxlm.convert.bert_hf import load_bert, read_bert_config
  source, family, hf = read_bert_config(path)
  if head_fields(cfg) != head_fields(source):
    raise ConversionError(
        f"{path} ({', '.join(hf.get('architectures') or [])}) has the heads "
        f"{head_fields(source)}, not {head_fields(cfg)}: load it with its own heads "
        f"(model.init_from then keeps the ones a run reuses).")
  _, params = load_bert(path, shardings)
  params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
  return LoadedParams(cfg, params, family, hf, path, labels=label_names(hf))


def _load_workdir(workdir: Path, cfg: LlamaConfig, shardings,
                  task: str | None = None) -> LoadedParams:
  """Parameters of a training run's best checkpoint when it ran with early stopping, else its
  latest; LoRA adapters are merged into the kernels. task: of a multi-task run, its trunk
  with that task's head."""
  config, run, params = _workdir_checkpoint_params(workdir, task)
  if run.trainer.lora is not None:
    from jaxlm.finetune.lora import merge_lora
    params = merge_lora(params, run.trainer.lora)
  params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  source = None
  hf = None
  if config.model.init_from:
    source = resolve_source(config.model.init_from)
    hf = json.loads((source / "config.json").read_text()) if hf_io.is_hf_directory(source) \
        else None
  from jaxlm.train.options import training_tokenizer
  has_tokenizer = source is not None and (source / "tokenizer.json").is_file()
  return LoadedParams(cfg, params, model_family(cfg), hf, source,
                      tokenizer_file=None if has_tokenizer else training_tokenizer(config),
                      labels=(tuple(config.data.labels) or None) if cfg.num_labels else None)


def _workdir_checkpoint_params(workdir: Path, task: str | None = None):
  """(config, run, the whole model's parameters with adapters unmerged) of a workdir's best
  or latest checkpoint. A checkpoint holds what trained; a frozen base is rebuilt from
  init_from or the seed. task: of a multi-task run, that task's config, run and model (its
  trunk with its head); required for one."""
  from jaxlm.checkpoint import Checkpointer
  from jaxlm.train.early_stopping import read_best
  from jaxlm.train.loop import build_run

  task_config = workdir_task_config(workdir, task)  # checks task before anything loads
  config = config_lib.read_workdir_config(workdir)
  with config.unlocked():  # restore on whatever devices this machine has
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    # A frozen base kept in bf16 saved training memory; exports use its original weights.
    config.finetune.frozen_dtype = ""
    config.distill.teacher = ""  # the teacher shaped training only, not the model
  run = build_run(config)
  checkpointer = Checkpointer(workdir / "checkpoints", every=1, keep=1)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {workdir / 'checkpoints'} yet.")
  best = read_best(workdir)
  if best is not None and best["step"] in checkpointer.all_steps():
    step = best["step"]
    print(f"Loading the best checkpoint of {workdir}: step {step} ({best['metric']} = "
          f"{best['value']:.4f}).", file=sys.stderr, flush=True)
  state, _ = checkpointer.restore(step, run.trainer.abstract_state(frozen=False))
  checkpointer.close()
  if run.trainer.partial:
    state = run.trainer.resume_state(state, run.fresh_state())
  params = run.trainer.model_params(state)
  if task is None:
    return config, run, params
  return task_config, run.task_runs[task], run.trainer.task_params(params, task)


def save_peft_adapter(workdir: str | Path, out: str | Path, base: str | None = None,
                      task: str | None = None) -> Path:
  """A LoRA run's adapters as a PEFT adapter directory (adapter_config.json +
  adapter_model.safetensors) for `peft.PeftModel.from_pretrained` on its base model, which
  adapter_config.json names as `base` (default: the run's model.init_from). task: of a
  multi-task run, the head to export with the shared adapters."""
  from jaxlm.finetune.lora import export_peft_adapter, unexported_trained
  workdir = resolve_source(workdir)
  if not config_lib.is_workdir(workdir):
    raise FileNotFoundError(f"{workdir} is not a `jaxlm train` workdir.")
  config, run, params = _workdir_checkpoint_params(workdir, task)
  if run.trainer.lora is None:
    raise ValueError(f"{workdir} was not trained with LoRA (finetune.lora_targets is empty); "
                     f"export it whole with --to-hf.")
  family = model_family(run.model_cfg)
  left_out = unexported_trained(run.trainer.trainable_mask, run.model_cfg, family)
  if left_out:
    raise ValueError(f"{workdir} trained {', '.join(left_out[:4])}"
                     f"{' ...' if len(left_out) > 4 else ''} beside the adapters and head; a "
                     f"PEFT LoRA adapter cannot carry them. Export the run merged with --to-hf.")
  with _atomic_directory(Path(out)) as tmp:
    export_peft_adapter(params, run.model_cfg, family, tmp,
                        base or config.model.init_from, lora=run.trainer.lora)
  return Path(out).absolute()


def _single_device_mesh():
  from jaxlm.parallel.mesh import build_mesh
  return build_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def load_model(path: str | Path, mesh=None, dtype: str | None = None,
               task: str | None = None) -> Llama:
  """A Llama whose call on int input_ids [batch, seq] returns float32 logits
  [batch, seq, vocab]. dtype sets parameter and compute dtype (default float32); with a
  mesh the weights are placed sharded as they load. task: the head of a multi-task workdir."""
  loaded = load_params(path, mesh=mesh, dtype=dtype, task=task)
  graphdef, _ = nnx.split(abstract_model(loaded.cfg))
  return nnx.merge(graphdef, loaded.params)


@contextlib.contextmanager
def _atomic_directory(out: Path):
  """Yields a temporary directory that becomes `out` only if the block succeeds."""
  out = out.expanduser().absolute()
  if out.exists():
    raise FileExistsError(f"{out} already exists; choose a new --out or remove it first.")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  try:
    yield tmp
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _copy_sidecars(loaded: LoadedParams, dest: Path) -> None:
  source = loaded.source
  if loaded.tokenizer_file:
    from jaxlm.data.text import load_tokenizer
    load_tokenizer(loaded.tokenizer_file).save(str(dest / "tokenizer.json"))
  if source is not None and source.suffix == ".gguf":
    from jaxlm.convert.gguf_import import save_gguf_tokenizer
    save_gguf_tokenizer(source, dest)
    return
  if source is None or not source.is_dir():
    return
  for name in hf_io.SIDECAR_FILES:
    if (source / name).is_file():
      shutil.copy2(source / name, dest / name)


def save_model_dir(loaded: LoadedParams, out: str | Path) -> Path:
  if is_encoder(loaded.cfg):
    raise ConversionError("BERT / RoBERTa models are used straight from their Hugging Face "
                          "directory (model.init_from, --model); jaxlm model directories hold "
                          "decoders only. Export a trained encoder with --to-hf.")
  out = Path(out)
  with _atomic_directory(out) as tmp:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save((tmp / "params").absolute(), loaded.params)
      checkpointer.wait_until_finished()
    (tmp / MODEL_FILE).write_text(json.dumps(
        {"format": "jaxlm-model", "version": 1, "family": loaded.family,
         "model": model_fields(loaded.cfg), "hf_config": loaded.hf_config,
         "labels": loaded.labels}, indent=2))
    _copy_sidecars(loaded, tmp)
  return out.expanduser().absolute()


def save_hf_dir(loaded: LoadedParams, out: str | Path, *, dtype: str | None = None,
                max_shard_gb: float = 5.0) -> Path:
  """An HF directory that transformers' from_pretrained loads."""
  dtype = dtype or hf_io.source_dtype(loaded.hf_config or {})
  out = Path(out)
  if is_encoder(loaded.cfg):
    return _save_encoder_hf_dir(loaded, out, dtype, max_shard_gb)
  with _atomic_directory(out) as tmp:
    hf_io.save_hf_params(tmp, loaded.cfg, loaded.params, dtype=dtype,
                         max_shard_bytes=int(max_shard_gb * 2**30))
    _copy_sidecars(loaded, tmp)
    base = {**_special_token_ids(tmp), **(loaded.hf_config or {})}
    config = write_hf_config(loaded.cfg, loaded.family or family_for(loaded.cfg), dtype=dtype,
                             base=base, labels=loaded.labels)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
  return out.expanduser().absolute()


def _save_encoder_hf_dir(loaded: LoadedParams, out: Path, dtype: str,
                         max_shard_gb: float) -> Path:
  """{Bert,Roberta}For{MaskedLM,SequenceClassification,TokenClassification} weights and
  config.json (the source's keys kept, so token ids survive), with the tokenizer files."""
  from jaxlm.convert.bert_hf import save_bert
  with _atomic_directory(out) as tmp:
    _copy_sidecars(loaded, tmp)
    base = {**_special_token_ids(tmp), **(loaded.hf_config or {})}
    save_bert(loaded.cfg, loaded.params, tmp, loaded.family or encoder_family(loaded.cfg),
              dtype, base=base, labels=loaded.labels, max_shard_bytes=int(max_shard_gb * 2**30))
  return out.expanduser().absolute()


def _special_token_ids(directory: Path) -> dict:
  """bos / eos / pad token ids of the tokenizer files in directory: what config.json needs
  when the source had none (a GGUF model, a run with its own tokenizer), e.g. for a
  classifier's pad_token_id."""
  if not (directory / "tokenizer.json").is_file():
    return {}
  from transformers import AutoTokenizer
  try:
    tokenizer = AutoTokenizer.from_pretrained(directory)
  except (OSError, ValueError):  # files transformers cannot read alone: export without ids
    return {}
  ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id")
         for name in ("bos", "eos", "pad")}
  return {key: value for key, value in ids.items() if value is not None}
