#!/bin/bash
# One device call that measures jaxlm against MaxText and PyTorch on the reference config
# (DESIGN.md: 1.1B Llama, seq 2048, batch 8, AdamW, bf16 compute, fp32 params) in the same
# run, as issue 7 asks. Parts run one after another, each in its own process under its own
# timeout: its usual limit, cut to what BUDGET_S (default 540 s) leaves; a part is skipped
# when less than its minimum is left, so the call ends inside the device tool's 600 s limit
# and still prints what it measured.
#
# Here, once (downloads MaxText's wheels and ml-collections, ~25 MB, into .anchor/):
#   bash ../shared/bench/anchor_wheels.sh .anchor
# Then, through the device tool (carry .anchor):
#   bash bench/gpu_session.sh                               # jaxlm none unrolled and scanned, MaxText, ...
#   bash bench/gpu_session.sh jaxlm:dots torch              # more variants, the PyTorch anchor
#   bash bench/gpu_session.sh jaxlm:none jaxlm:none+xla_gpu_enable_triton_gemm=false
#                                                           # an XLA flag's effect, same run
#   bash bench/gpu_session.sh jaxlm:minimal+docs4           # 4 documents a row: masked
#   bash bench/gpu_session.sh jaxlm:none+chunk512           # loss 512 positions at a time
#   bash bench/gpu_session.sh jaxlm:minimal+unroll          # layers unrolled, not scanned
#   bash bench/gpu_session.sh jaxlm:minimal+docs4+pallas_gpu # Pallas attention, document mask
# Parts: jaxlm:<remat policy>[+<XLA flag without -->...][+docs<N>][+chunk<N>][+unroll][+<attention>]
# (remat none, full, dots, minimal, minimal_with_attention; the flags join XLA_FLAGS for
# that part only; docsN packs N documents into each row, as real data is, so attention gets
# a document mask; chunkN sets train.loss_chunk_len; unroll sets model.scan_layers=False
# (a Python loop over the layers: no copies of each layer's saved activations into and out
# of the scan's stacked buffers); xla, cudnn, pallas_gpu or splash sets
# model.attention_impl), maxtext,
# torch, attention (bench/attention_check.py: XLA, cuDNN and Pallas attention checked
# against float32 and timed, ATTENTION_ARGS adds arguments), ceilings (bench/ceilings.py:
# this GPU's bf16 matmul rate and memory bandwidth, CEILINGS_ARGS adds arguments),
# plan:<remat>[+unroll][+h100] (`jaxlm plan --kernels` of the same step on the host's CPU,
# or compiled for an H100 by XLA's GPU compiler without running: its planned peak memory
# and, for the H100, the time its kernels take at least, at the ceilings measured in this
# run when the ceilings part came first, else at the datasheet's rates, set beside the
# measured ones; PLAN_ARGS replaces its preset and shape). BENCH_ARGS adds arguments to
# bench/train_throughput.py (a dry run on CPU: BENCH_ARGS="--preset tiny --seq-len 64"
# bash bench/gpu_session.sh jaxlm:minimal).
# One JSON line per part goes to $OUT (or /tmp/jaxlm_bench); the logs, MaxText's metrics and
# each jaxlm part's profiler trace (its summary is in the JSON line: device time per step by
# kernel category, top kernels) go to $OUT/logs.tgz, refreshed after every part, so that the
# device tool's eight returned files hold them all. A table is printed last; under a jaxlm
# part whose step a plan:...+h100 part also compiled, its measured device time per kernel
# category is set beside the least the planned kernels could take.
set -u
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(ceilings jaxlm:none+unroll maxtext jaxlm:none attention
                                  plan:none+unroll+h100 jaxlm:minimal_with_attention)
out=${OUT:-/tmp/jaxlm_bench}
budget=${BUDGET_S:-540}
anchor=.anchor
logs=$(mktemp -d /tmp/jaxlm_bench_logs.XXXX)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$SECONDS

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv > "$out/gpu.csv" 2>&1
cat "$out/gpu.csv"
# The device image has JAX, Flax, Optax and Orbax but not ml-collections: carried as a wheel.
site=/tmp/jaxlm_site
if ! python3 -c "import ml_collections" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$anchor"/whl/ml_collections-*.whl || { echo "carry .anchor (see the header)"; exit 1; }
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import jax, flax, optax, orbax.checkpoint, jaxlm.train.loop; \
print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" || exit 1

run_part() {  # name, most seconds, fewest seconds worth starting with, command...
  local name=$1 limit=$2 least=$3; shift 3
  local left=$((budget - (SECONDS - start)))
  (( left < limit )) && limit=$left
  if (( limit < least )); then
    echo "{\"part\": \"$name\", \"skipped\": \"needs $least s, BUDGET_S=$budget leaves $left\"}" \
      > "$out/$name.json"
    return
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.json" 2> "$logs/$name.log"
  echo "$name: rc $? in $((SECONDS - t0)) s"
  # Traces (for TensorBoard's profile plugin) travel flat, when under the tool's 16 MiB.
  for dir in "$logs"/profile_*/; do
    trace=$(find "$dir" -name '*.xplane.pb' -size -12M 2>/dev/null | head -1)
    [ -n "$trace" ] && cp "$trace" "${dir%/}.xplane.pb"
  done
  (cd "$logs" && find . -maxdepth 1 -type f -print0 | tar czf "$out/logs.tgz" --null -T -)
}

for part in "${parts[@]}"; do
  case $part in
    jaxlm:*)
      variant=${part#jaxlm:}
      remat=${variant%%+*}
      flags="" extra=""
      IFS=+ read -ra options <<< "${variant#"$remat"}"
      for option in "${options[@]}"; do
        case $option in
          "") ;;
          docs[0-9]*) extra="$extra --docs-per-row ${option#docs}" ;;
          chunk[0-9]*) extra="$extra --config.train.loss_chunk_len=${option#chunk}" ;;
          unroll) extra="$extra --config.model.scan_layers=False" ;;
          xla|cudnn|pallas_gpu|splash) extra="$extra --config.model.attention_impl=$option" ;;
          *) flags="$flags --$option" ;;
        esac
      done
      name=jaxlm_$(tr -c 'A-Za-z0-9_.\n' '-' <<< "${variant//+/_}")  # names the tool returns
      # XLA reads a non-empty XLA_FLAGS that does not start with -- as a file name, and dies.
      ( xla_flags=$(echo ${XLA_FLAGS:-} $flags)  # words, no stray spaces
        [ -n "$xla_flags" ] && export XLA_FLAGS="$xla_flags"
        run_part "$name" 170 100 python3 bench/train_throughput.py --remat "$remat" --steps 10 \
          --warmup 2 --profile "$logs/profile_${name#jaxlm_}" $extra ${BENCH_ARGS:-} ) ;;
    maxtext)
      # anchors_gpu.sh's last line runs the PyTorch anchor, which is its own part here.
      run_part maxtext_anchor 330 200 bash -c \
        "sed '\$d' $anchor/anchors_gpu.sh | RESULTS_DIR=$logs bash -s $anchor" ;;
    torch)
      run_part torch_anchor 210 150 python3 "$anchor/torch_llama_anchor.py" --compile ;;
    attention)  # XLA, cuDNN and Pallas attention against float32, with and without a document mask
      run_part attention_check 150 60 python3 bench/attention_check.py ${ATTENTION_ARGS:-} ;;
    ceilings)  # this GPU's bf16 matmul rate and memory bandwidth, for the plans' bounds
      run_part ceilings 90 30 python3 bench/ceilings.py ${CEILINGS_ARGS:-} ;;
    plan:*)  # jaxlm plan's memory for the same step, compiled on the host's CPU, or with
             # +<target> by XLA's GPU compiler for that GPU without using it: to set beside
             # what the GPU measured
      spec=${part#plan:}
      remat=${spec%%+*}
      target="" unroll=""
      IFS=+ read -ra options <<< "${spec#"$remat"}"
      for option in "${options[@]}"; do
        case $option in
          "") ;;
          unroll) unroll=--config.model.scan_layers=False ;;
          *) target=$option ;;
        esac
      done
      # Compiled for a GPU, its kernels are bounded at the ceilings measured in this run, if
      # the ceilings part ran before it, rather than at the datasheet's rates.
      peak=""
      [ -n "$target" ] && [ -s "$out/ceilings.json" ] && peak=$(python3 -c "import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
print(f\"{r['matmul_tflops']:.1f},{r['memory_tbps']:.3f}\")" "$out/ceilings.json" 2>/dev/null)
      # data.shaping=stream: no document mask, as in the benchmark's rows (without docsN).
      JAX_PLATFORMS=cpu run_part "plan_$remat${unroll:+_unroll}${target:+_$target}" 90 20 \
        python3 -m jaxlm.plan_cli \
        ${PLAN_ARGS:---preset ref-1.1b --seq-len 2048 --batch-size 8} --mesh data=1 \
        --devices 1 --remat "$remat" ${target:+--target "$target"} $unroll --kernels 0 --json \
        ${peak:+--peak-rates "$peak"} --config.data.shaping=stream ;;
    *) echo "unknown part $part (jaxlm:<remat>[+<XLA flag>...][+docs<N>][+chunk<N>][+unroll]" \
            "[+xla|cudnn|pallas_gpu|splash], maxtext, torch, attention, ceilings," \
            "plan:<remat>[+unroll][+h100])"
       exit 2 ;;
  esac
done

python3 - "$out" <<'PY'
import json, pathlib, re, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
  lines = [l for l in path.read_text().splitlines() if l.startswith(("{", "[{"))]
  result = json.loads(lines[-1]) if lines else {"error": "no result, see log"}
  rows.append((path.stem, result[0] if isinstance(result, list) else result))  # plan: a list
maxtext = next((r.get("tokens_per_s") for n, r in rows if n == "maxtext_anchor"), None)
plans = {n: r for n, r in rows if r.get("kernel_bound_s")}  # compiled for a GPU model here
print(f"{'part':<16}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'vs MaxText':>11}{'compile s':>10}"
      f"{'peak GiB':>9}")
for name, r in rows:
  tps = r.get("tokens_per_s")
  if "temp_bytes" in r or ("layout" in r and "error" in r):  # jaxlm plan
    where = r.get("compiled_for", "cpu")
    bound = r.get("kernel_bound_s", {}).get("total")
    print(f"{name:<16} planned for {where}: " + (f"peak {r['peak_bytes'] / 2**30:.1f} GiB (temp "
          f"{r['temp_bytes'] / 2**30:.1f}), attention as {r['attention_impl']}"
          + (f", kernels move {r['kernels']['total']['bytes'] / 1e9:.0f} GB: {bound * 1e3:.0f}"
             f" ms a step at least" if bound else "")
          + (f" (at {rates.group(1)})" if bound and (rates := re.search(
              r"rates: ([\d,.]+ TFLOP/s, [\d.]+ TB/s)", r.get("rates", ""))) else "")
          + (f", MFU at most {r['bound']['mfu_at_most']:.0%}"
             if (r.get("bound") or {}).get("mfu_at_most") else "")
          if "error" not in r else r["error"]))
    continue
  if "matmul_tflops" in r:  # bench/ceilings.py
    print(f"{name:<16} measured: {r['matmul_tflops']:.0f} TFLOP/s bf16 matmul "
          f"({r['matmul_n']}^3), {r['memory_tbps']:.2f} TB/s memory")
    continue
  if "cases" in r:  # bench/attention_check.py
    for c in r["cases"]:
      what = c.get("error") or (f"max rel err {max(c['errors'].values()):.1e}, "
                                f"{c['ms_forward_backward']:.2f} ms, {c['tflops']:.0f} TFLOP/s")
      print(f"{name:<16} {c['implementation']} docs {c['docs_per_row']}: {what}"
            f"{'' if c['ok'] else '  FAILED'}")
    continue
  if tps is None:
    print(f"{name:<16} {r.get('skipped') or r.get('error') or r}")
    continue
  tflops = r.get("tflops_per_device") or r.get("tflops")  # the anchors name it tflops
  # MFU of 989 TFLOP/s (DESIGN.md's convention); jaxlm's own is null on unknown devices.
  mfu = r["mfu"] if "mfu" in r else r.get("mfu_vs_989", tflops / 989 if tflops else None)
  tflops, mfu = (f"{tflops:.0f}" if tflops else "-"), (f"{mfu:.3f}" if mfu else "-")
  ratio = f"{tps / maxtext:.3f}" if maxtext else "-"
  comp = f"{r['compile_s']:.1f}" if r.get("compile_s") else "-"
  mem = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r.get("peak_memory_bytes") else "-"
  part = name
  if len(name) > 15:  # a variant with XLA flags: its name on a line of its own
    print(name)
    name = ""
  print(f"{name:<16}{tps:>10,.0f}{tflops:>9}{mfu:>7}{ratio:>11}{comp:>10}{mem:>9}")
  if (r.get("profile") or {}).get("error"):
    print(f"{'':<4}profile failed: {r['profile']['error']}")
  elif r.get("profile"):  # jaxlm's parts: where the device time went (jaxlm/profiling.py)
    p = r["profile"]
    print(f"{'':<4}busy {p['busy_ms_per_step']:.1f} of {p['wall_ms_per_step']:.1f} ms/step; "
          + ", ".join(f"{k} {c['ms_per_step']:.1f}" for k, c in p["categories"].items()))
    for k in p["top"][:5]:
      print(f"{'':<6}{k['ms_per_step']:7.2f} ms {k['calls_per_step']:5.0f}x {k['name'][:60]}")
    # The same step planned for an H100 (plan:<remat>[+unroll]+h100): measured against the
    # least its kernels could take, category by category.
    planned = f"plan_{part.removeprefix('jaxlm_')}_h100"
    if bounds := plans.get(planned, {}).get("kernel_bound_s"):
      measured = {k: c["ms_per_step"] for k, c in p["categories"].items()}
      measured["total"] = p["busy_ms_per_step"]
      print(f"{'':<4}measured / at least ({planned}), ms: " + ", ".join(
          f"{k} {measured.get(k, 0.0):.1f} / {seconds * 1e3:.1f}" for k, seconds in bounds.items()
          if seconds or measured.get(k)))
PY
