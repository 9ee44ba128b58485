#!/usr/bin/env bash
# The speed checks that need a GPU, as one prepared script (README "Speed").
#
#   benchmarks/gpu_check.sh pack [FER2013_FOLDER [TAR]]  # here, once: the real data -> .gpu/fer2013.tar.gz (git-ignored)
#   benchmarks/gpu_check.sh wheels                       # here, once: Optuna's wheels for the tune step -> .whl/
#   benchmarks/gpu_check.sh run [STEP ...]               # on the GPU machine, from the repo root
#
# STEPs, in the default order (all speed steps when none is named; most important first):
#   throughput  benchmarks/throughput.py: conventional vs fer-exp (eager, and with the CUDA-graph step:
#               --compile $FER_GPU_THROUGHPUT_COMPILE) vs compute bound, ablations, ResNet18 at 112 and 224 px
#   cnn-graph   a full CNN training as a user gets it: compile auto ($FER_GPU_GRAPH_MODE; CUDA graphs where the
#               measured saving exceeds the compile time) and amp auto (both measured, cached; the JSON's
#               compile_choice and amp_choice say what was measured), twice: cnn_graph is a machine's first
#               run with compile auto (it measures, compiling cold and warm; the throughput step's compile
#               may have warmed inductor's cache), cnn_graph_warm a later one (the measurement cached,
#               inductor's caches warm): the goal is 60 epochs in <= 45 s
#   profile     benchmarks/profile_step.py: where a step's time goes (wall against device-busy ms, launches,
#               graph replays, syncs, top operators) for the CNN as configured by default (compile and amp
#               auto) and for ResNet18 at 112 and 224 px (eager), each against its compute bound
#   cnn-bf16    a full CNN training (experiments/cnn.yaml, $FER_GPU_EPOCHS epochs, early stopping off), bf16, eager
#   cnn-fp32    the same CNN training with amp off, eager: the bf16-vs-fp32 accuracy check
#   resnet      ResNet18 at 112 and 224 px, $FER_GPU_RESNET_EPOCHS epochs each (pretrained none: no network)
#   compile     throughput.py again with torch.compile's other modes ($FER_GPU_COMPILE), a process and a limit each
#   tune        benchmarks/tune_packing.py: trials per hour of a study per model ($FER_GPU_TUNE_MODELS), 1 worker
#               against $FER_GPU_TUNE_WORKERS packed on the GPU, $FER_GPU_TUNE_SECONDS each; needs Optuna (`wheels`)
# and, only when named (about 8 minutes on an H200; the accuracy issue's measurement):
#   accuracy    the honest-protocol ablations (val = seeded hold-out of train, test = the test folder), all
#               in parallel: the CNN recipe and each lever alone (experiments/ablation_cnn.yaml's arms on cnn.yaml,
#               or $FER_GPU_ABLATIONS; $FER_GPU_EPOCHS epochs, amp $FER_GPU_ACCURACY_AMP, compile
#               $FER_GPU_ACCURACY_COMPILE), then experiments/best_cnn.yaml for the seeds $FER_GPU_BEST_SEEDS;
#               every run reports val and test with no, flip and ten-crop TTA (select on val, report test);
#               the finished runs come back as $OUT/runs.tar.gz.part00, 01, ... (weights, history, config):
#               mkdir runs && cat runs.tar.gz.part* | tar -xz -C runs; then, where MLflow is, track and compare
#               them: fer-exp study experiments/ablation_cnn.yaml --data data/fer2013 --seeds 42 --epochs 60
#               --early-stopping 0 --amp off --arms recipe,shift-zoom,rotation-20,erasing-0.5,smoothing,ema,mixup,unweighted,regularised --import runs
#               (the ablations), and ... --arms best --seeds 42,1,2 --amp off --import runs (best_cnn.yaml's
#               seeds); test is evaluated there, on the same data
#   copies      (named only; ~4.5 minutes) what FER2013's copies are worth: experiments/best_cnn.yaml (its
#               60 epochs) with the copies, with duplicates=drop, and with duplicates=drop at copy_correlation
#               0.95 (near-copies dropped too), for the seeds $FER_GPU_COPIES_SEEDS (42 1 2), all in parallel
#               ($FER_GPU_COPIES_SETTINGS: some of report drop drop-near); each reports val and test with each TTA, and the accuracy on the
#               uncopied test faces; the runs come back as the accuracy step's do, and fer-exp study
#               experiments/copies_cnn.yaml --data data/fer2013 --amp off --import runs tracks and compares them
# Results: one JSON (and log) per step, packed after every step into $OUT/results.tar.gz, beside log.txt,
# summary.txt and the accuracy step's runs.tar.gz.part*: nothing else in $OUT (the device tool returns at
# most 8 files, 16 MiB each).
# Time: every step has its own limit and the whole run a deadline ($FER_GPU_DEADLINE s, 570): a step
# that cannot start with 30 s left is skipped and said so, so one call of the device tool always
# returns what it measured; a second call can name the steps left.
# Knobs (environment): FER_GPU_EPOCHS (60), FER_GPU_RESNET_EPOCHS (2), FER_GPU_BATCHES (50),
# FER_GPU_WORKERS (8), FER_GPU_COMPILE (the compile step's modes: "default max-autotune"),
# FER_GPU_THROUGHPUT_COMPILE ("reduce-overhead"), FER_GPU_PROFILE_ARGS, FER_GPU_TAR (.gpu/fer2013.tar.gz),
# FER_GPU_DATA (a source instead of it), FER_GPU_SET ("k=v ..." config overrides for every training),
# FER_GPU_THROUGHPUT_ARGS (extra throughput.py options), FER_GPU_DEADLINE, FER_GPU_<STEP>_LIMIT,
# FER_GPU_TUNE_MODELS ("cnn cnn-graph resnet18"; cnn-graph: the CNN study with compile=reduce-overhead), FER_GPU_TUNE_WORKERS ("1 8"), FER_GPU_TUNE_SECONDS (60),
# FER_GPU_TUNE_SET_CNN ("epochs=6 input_size=48"), FER_GPU_TUNE_SET_RESNET18 ("epochs=2 input_size=112 pretrained=none").
# The machine needs torch, torchvision, timm, numpy, pillow, pyyaml, click, tqdm, safetensors and
# scikit-learn; not mlflow (the training path and studies run without tracking here). The tune step
# needs Optuna: `wheels` saves it and its missing dependencies to .whl/ (5.5 MB, git-ignored); carry
# [".gpu", ".whl"] and the step installs them into /tmp/site.
# Without .gpu/fer2013.tar.gz the data is synthetic faces of FER2013's size: timings hold, accuracies do not.
# With the workplace's device tool (15 device minutes a session, the start included: one ~9-minute call and
# a short one): the speed issue's goals first, run(command="bash benchmarks/gpu_check.sh run throughput
# cnn-graph profile", carry=[".gpu"], timeout_s=600); every speed step: run(command="bash benchmarks/gpu_check.sh
# run", carry=[".gpu", ".whl"], timeout_s=600); the accuracy measurement alone (a session of its own):
# run(command="bash benchmarks/gpu_check.sh run accuracy", carry=[".gpu"], timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."
SPEED_STEPS=(throughput cnn-graph profile cnn-bf16 cnn-fp32 resnet compile tune)
ALL_STEPS=("${SPEED_STEPS[@]}" accuracy copies)
# the ablation arms: experiments/ablation_cnn.yaml's arms on cnn.yaml (the recipe and each lever alone), or
# FER_GPU_ABLATIONS: "name:overrides ..." (overrides comma-separated) against experiments/cnn.yaml

if [[ "${1:-}" == "wheels" ]]; then  # the device's python is 3.12 on x86-64 and lacks Optuna, SQLAlchemy, Alembic
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "optuna==${FER_GPU_OPTUNA:-5.0.0}" "sqlalchemy>=2,<2.2" "alembic>=1.5" mako colorlog || exit 1
    ls -l .whl
    exit 0
fi

if [[ "${1:-}" == "pack" ]]; then
    src="${2:-../shared/fer2013}" tarball="${3:-.gpu/fer2013.tar.gz}"
    [[ -d "$src/train" && -d "$src/test" ]] || { echo "error: $src has no train/ and test/ folders (the Kaggle FER2013 layout)" >&2; exit 2; }
    mkdir -p "$(dirname "$tarball")"
    tar -czf "$tarball" -C "$(dirname "$src")" --transform "s,^$(basename "$src"),fer2013," "$(basename "$src")/train" "$(basename "$src")/test" || exit 1
    ls -l "$tarball"
    echo "carry [\".gpu\"] in the device run; command: bash benchmarks/gpu_check.sh run"
    exit 0
fi
if [[ "${1:-}" != "run" ]]; then
    sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    exit 2
fi
shift
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=("${SPEED_STEPS[@]}")
for s in "${steps[@]}"; do  # a typo must not cost device minutes: check before any work
    [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "unknown step $s (${ALL_STEPS[*]})" >&2; exit 2; }
done

OUT="${OUT:-$PWD/gpu-check-out}"
# the device tool returns at most 8 files from $OUT, so what the steps write lives outside it and comes
# back packed: results.tar.gz (JSON and logs), runs.tar.gz.part* (the accuracy step's finished runs)
RESULTS="$(mktemp -d)"
RUNS="$(mktemp -d)"
TEMPS=("$RESULTS" "$RUNS")  # removed on exit: what they held is packed in $OUT
trap 'rm -rf "${TEMPS[@]}"' EXIT
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
EPOCHS="${FER_GPU_EPOCHS:-60}"
RESNET_EPOCHS="${FER_GPU_RESNET_EPOCHS:-2}"
BATCHES="${FER_GPU_BATCHES:-50}"
WORKERS="${FER_GPU_WORKERS:-8}"
DEADLINE="${FER_GPU_DEADLINE:-570}"
read -ra COMPILE_MODES <<< "${FER_GPU_COMPILE-default max-autotune}"  # set but empty: eager only
read -ra THROUGHPUT_COMPILE <<< "${FER_GPU_THROUGHPUT_COMPILE-reduce-overhead}"  # the goal's row (empty: none)
read -ra PROFILE_EXTRA <<< "${FER_GPU_PROFILE_ARGS:-}"  # e.g. "--steps 2 --warmup 1"
read -ra THROUGHPUT_EXTRA <<< "${FER_GPU_THROUGHPUT_ARGS:-}"  # e.g. "--rounds 1" (later options win)
EXTRA_SETS=()
for pair in ${FER_GPU_SET:-}; do EXTRA_SETS+=(--set "$pair"); done  # e.g. "batch_size=16 eval_batch_size=16"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FER_EXP_CACHE_DIR="${FER_EXP_CACHE_DIR:-/tmp/fer-exp-cache}"
exec > >(tee -a "$OUT/log.txt") 2>&1

if [[ -n "${FER_GPU_DATA:-}" ]]; then
    DATA="$FER_GPU_DATA"
elif [[ -f "${FER_GPU_TAR:-.gpu/fer2013.tar.gz}" ]]; then
    unpacked="$(mktemp -d)"
    TEMPS+=("$unpacked")
    tar -xzf "${FER_GPU_TAR:-.gpu/fer2013.tar.gz}" -C "$unpacked" || exit 1
    DATA="$unpacked/fer2013"
else
    DATA="synthetic:28709,3589,3589"
fi
echo "== $(date -u +%FT%TZ) data=$DATA epochs=$EPOCHS steps=${steps[*]} deadline=${DEADLINE}s"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

allowed() {  # name, seconds wanted: prints the seconds it may have, or says it is skipped (status 1)
    local left=$((DEADLINE - SECONDS))
    if (( left < 30 )); then
        echo "== $1 skipped: ${left} s left before the ${DEADLINE} s deadline" >&2
        return 1
    fi
    echo $(( $2 < left ? $2 : left ))
}
step() {  # name, seconds allowed, command... (stdout is the caller's: it may be the result file)
    local name="$1" limit
    limit=$(allowed "$1" "$2") || return 0
    shift 2
    echo "== $name (limit ${limit}s): $*" >&2
    local start=$SECONDS
    timeout -k 10 "$limit" "$@"  # -k: a process stuck in a CUDA call or an exit hook ignores TERM
    echo "== $name exit $? after $((SECONDS - start)) s" >&2
    pack_results
}
pack_results() {  # what is measured so far, in one file; packed aside, then renamed: a kill never leaves half a tarball
    tar -czf "$OUT/results.partial" -C "$RESULTS" . 2>/dev/null && mv -f "$OUT/results.partial" "$OUT/results.tar.gz" \
        || rm -f "$OUT/results.partial"  # (the last whole tarball stays; nothing else is left in $OUT)
}
full() {  # json name, seconds allowed, full_training.py arguments...
    local name="$1" limit="$2"; shift 2
    step "$name" "$limit" "$PY" benchmarks/full_training.py --data "$DATA" --json "$RESULTS/$name.json" --no-tta "$@" \
        "${EXTRA_SETS[@]}" >/dev/null  # speed steps: no TTA evaluation (the accuracy step has it)
}
cnn_args=(--config experiments/cnn.yaml --set epochs="$EPOCHS" --set early_stopping=0)
parallel_full() {  # step name, seconds allowed, then "json_name|full_training.py arguments" for each run
    local name="$1" limit
    limit=$(allowed "$1" "$2") || return 0
    shift 2
    echo "== $name (limit ${limit}s): $# runs in parallel" >&2
    local start=$SECONDS spec run args pids=()
    for spec in "$@"; do
        run="${spec%%|*}"
        read -ra args <<< "${spec#*|}"
        timeout -k 10 "$limit" "$PY" benchmarks/full_training.py --data "$DATA" --json "$RESULTS/$run.json" "${args[@]}" \
            "${EXTRA_SETS[@]}" --export "$RUNS/$run.pt" > /dev/null 2> "$RESULTS/$run.log" &
        pids+=($!)
    done
    local failed=0 pid
    for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
    echo "== $name: $failed of $# runs failed or ran out of time, after $((SECONDS - start)) s" >&2
    pack_results
    # the finished runs (best weights, history, config; ~2.4 MB each, twice with EMA) in parts of at most
    # 15 MiB (the device tool returns files up to 16 MiB): cat runs.tar.gz.part* | tar -xz -C runs, then
    # fer-exp study ... --import runs tracks them where MLflow is
    local parts
    parts="$(mktemp -d)"  # packed aside, then swapped in: a kill meanwhile leaves the previous parts whole
    tar -czf - -C "$RUNS" . | split -b 15M -d - "$parts/runs.tar.gz.part" &&
        rm -f "$OUT"/runs.tar.gz.part* && mv "$parts"/runs.tar.gz.part* "$OUT"/
    rm -rf "$parts"
}

for s in "${steps[@]}"; do
    case "$s" in
        throughput)
            step throughput "${FER_GPU_THROUGHPUT_LIMIT:-240}" "$PY" benchmarks/throughput.py --data "$DATA" \
                --batches "$BATCHES" --rounds 3 --workers "$WORKERS" --resnet-batches 20 --resnet-sizes 112 224 \
                ${THROUGHPUT_COMPILE[@]:+--compile "${THROUGHPUT_COMPILE[@]}"} "${THROUGHPUT_EXTRA[@]}" \
                --json > "$RESULTS/throughput.json" ;;
        profile)
            for spec in "cnn|--config experiments/cnn.yaml" \
                        "resnet18_112|--config experiments/resnet18.yaml --set pretrained=none --set input_size=112 --set compile=off" \
                        "resnet18_224|--config experiments/resnet18.yaml --set pretrained=none --set input_size=224 --set compile=off"; do
                read -ra args <<< "${spec#*|}"
                step "profile-${spec%%|*}" "${FER_GPU_PROFILE_LIMIT:-90}" "$PY" benchmarks/profile_step.py --data "$DATA" \
                    "${args[@]}" "${EXTRA_SETS[@]}" "${PROFILE_EXTRA[@]}" --json "$RESULTS/profile_${spec%%|*}.json" >/dev/null
            done ;;
        cnn-graph)  # twice: the machine's first run (measures, compiles cold), then a later run (cached, warm)
            for run in cnn_graph cnn_graph_warm; do
                full "$run" "${FER_GPU_CNN_LIMIT:-240}" "${cnn_args[@]}" --set amp=auto --set compile="${FER_GPU_GRAPH_MODE:-auto}"
            done ;;
        cnn-bf16) full cnn_bf16 "${FER_GPU_CNN_LIMIT:-240}" "${cnn_args[@]}" --set amp=bf16 --set compile=off ;;  # (auto may pick fp32)
        cnn-fp32) full cnn_fp32 "${FER_GPU_CNN_LIMIT:-240}" "${cnn_args[@]}" --set amp=off --set compile=off ;;
        resnet)
            for size in 112 224; do
                full "resnet18_$size" "${FER_GPU_RESNET_LIMIT:-120}" --config experiments/resnet18.yaml --set pretrained=none \
                    --set input_size="$size" --set epochs="$RESNET_EPOCHS" --set early_stopping=0
            done ;;
        tune)
            if ! "$PY" -c "import optuna" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
                "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
                export PYTHONPATH="$PYTHONPATH:/tmp/site"
            fi
            read -ra TUNE_WORKERS <<< "${FER_GPU_TUNE_WORKERS:-1 8}"
            for model in ${FER_GPU_TUNE_MODELS:-cnn cnn-graph resnet18}; do
                case "$model" in  # cnn-graph: the CNN study with every trial's step a captured CUDA graph
                    resnet18) sets="${FER_GPU_TUNE_SET_RESNET18-epochs=2 input_size=112 pretrained=none}" ;;
                    cnn-graph) sets="${FER_GPU_TUNE_SET_CNN-epochs=6 input_size=48} compile=reduce-overhead" ;;
                    *) sets="${FER_GPU_TUNE_SET_CNN-epochs=6 input_size=48} compile=off" ;;
                esac
                TUNE_SETS=()
                for pair in $sets ${FER_GPU_SET:-}; do TUNE_SETS+=(--set "$pair"); done
                step "tune-$model" "${FER_GPU_TUNE_LIMIT:-240}" "$PY" benchmarks/tune_packing.py --data "$DATA" \
                    --config "experiments/tune_${model%-graph}.yaml" --workers "${TUNE_WORKERS[@]}" \
                    --seconds "${FER_GPU_TUNE_SECONDS:-60}" "${TUNE_SETS[@]}" --json "$RESULTS/tune_$model.json" >/dev/null
            done ;;
        accuracy)
            specs=()
            accuracy_sets="--set amp=${FER_GPU_ACCURACY_AMP:-off} --set compile=${FER_GPU_ACCURACY_COMPILE:-off}"
            if [[ -n "${FER_GPU_ABLATIONS+set}" ]]; then
                for arm in $FER_GPU_ABLATIONS; do
                    sets=()
                    IFS=, read -ra pairs <<< "${arm#*:}"
                    for pair in "${pairs[@]}"; do [[ -n "$pair" ]] && sets+=(--set "$pair"); done
                    specs+=("ablation_${arm%%:*}|${cnn_args[*]} $accuracy_sets ${sets[*]}")
                done
            else
                arms=$("$PY" benchmarks/full_training.py --study-arms experiments/ablation_cnn.yaml --arms-on cnn.yaml) || exit 1
                while IFS='|' read -r name options; do  # the arm's own options last: they win over cnn_args
                    specs+=("ablation_$name|${cnn_args[*]} $accuracy_sets $options")
                done <<< "$arms"
            fi
            parallel_full ablations "${FER_GPU_ABLATIONS_LIMIT:-330}" "${specs[@]}"
            specs=()
            for seed in ${FER_GPU_BEST_SEEDS:-42 1 2}; do
                specs+=("best_cnn_seed$seed|--config experiments/best_cnn.yaml --set seed=$seed --set amp=${FER_GPU_ACCURACY_AMP:-off} --set compile=${FER_GPU_ACCURACY_COMPILE:-off} ${FER_GPU_BEST_SETS:-}")
            done
            parallel_full best "${FER_GPU_BEST_LIMIT:-210}" "${specs[@]}" ;;
        copies)
            specs=()
            for seed in ${FER_GPU_COPIES_SEEDS:-42 1 2}; do
                for setting in ${FER_GPU_COPIES_SETTINGS:-report drop drop-near}; do
                    case "$setting" in  # the arms of experiments/copies_cnn.yaml
                        report|drop) copies="--set duplicates=$setting" ;;
                        drop-near) copies="--set duplicates=drop --set copy_correlation=0.95" ;;
                        *) echo "FER_GPU_COPIES_SETTINGS: unknown setting '$setting' (report, drop, drop-near)" >&2; exit 2 ;;
                    esac
                    specs+=("copies_${setting}_seed$seed|--config experiments/best_cnn.yaml --set seed=$seed $copies --set amp=${FER_GPU_ACCURACY_AMP:-off} --set compile=${FER_GPU_ACCURACY_COMPILE:-off} ${FER_GPU_BEST_SETS:-}")
                done
            done
            parallel_full copies "${FER_GPU_COPIES_LIMIT:-300}" "${specs[@]}" ;;
        compile)  # a process (and a limit) per mode: a cold max-autotune that overruns loses only its own row
            for mode in "${COMPILE_MODES[@]:-eager}"; do  # (none named: the eager path alone)
                compile_args=()
                [[ "$mode" != eager ]] && compile_args=(--compile "$mode")
                step "compile-$mode" "${FER_GPU_COMPILE_LIMIT:-240}" "$PY" benchmarks/throughput.py --data "$DATA" \
                    --batches "$BATCHES" --rounds 3 --workers "$WORKERS" --skip-resnet --skip-ablations "${THROUGHPUT_EXTRA[@]}" \
                    "${compile_args[@]}" --json > "$RESULTS/compile_$mode.json"
            done ;;
    esac
done

"$PY" - "$RESULTS" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
for name in ["throughput", *sorted(p.stem for p in out.glob("compile_*.json"))]:
    t = load(name)
    if not t:
        continue
    print(f"{name} on {t['device']} (batch {t['batch_size']}), images/s:")
    for group, methods in t["images_per_second"].items():
        for method, phases in methods.items():
            print(f"  {group:14s} {method:28s} " + "  ".join(f"{k} {v:>10.1f}" for k, v in phases.items()))
    for k, v in t["ratios"].items():
        print(f"  ratio {k}: {v}")
    for k, v in t.get("compile", {}).items():
        print(f"  {k}: {v}")
for name in ("cnn", "resnet18_112", "resnet18_224"):
    t = load(f"profile_{name}")
    if not t:
        continue
    print(f"profile {name} ({t['compile_choice']}; amp {t['amp_choice']}), ms a step of {t['batch_size']}:")
    for method in ("fer-exp", "compute bound"):
        r = t[method]
        print(f"  {method:14s} wall {r['wall_ms_per_step']:8.3f}  device busy {r['device_busy_ms_per_step']}  "
              f"launches {r['kernel_launches_per_step']}  graph replays {r['graph_replays_per_step']}  "
              f"syncs {r['host_syncs_per_step']}  aten ops {r['aten_ops_per_step']}")
    print(f"  fer-exp/compute bound {t['fer-exp/compute bound']}")
for model in ("cnn", "cnn-graph", "resnet18"):
    t = load(f"tune_{model}")
    if not t:
        continue
    print(f"tune {model}: {t['seconds']} s per study, {' '.join(t['set'])}")
    for r in t["runs"]:
        print(f"  {r['workers']:3d} worker(s): " + (r["error"][:300] if "error" in r else
              f"{r['finished_trials']} trials in {r['wall_seconds']} s = {r['trials_per_hour']} trials/h, "
              f"median trial {r['median_trial_seconds']} s, x{r.get('speedup')}, best val {r['best_value']}"))
runs = sorted(p.stem for p in out.glob("ablation_*.json")) + sorted(p.stem for p in out.glob("best_cnn_seed*.json")) \
    + sorted(p.stem for p in out.glob("copies_*.json"))
if runs:
    print("accuracy (val = hold-out of train, test = test folder; TTA chosen on val): run | epochs | best val acc | "
          "test acc / macro-F1 with none, flip, tencrop | disgust, fear test acc")
for name in runs:
    r = load(name)
    if r.get("partial"):  # cut off by its time limit: what it measured until then
        print(f"  {name:26s} {r['epochs_run']:4d} {max(r['val_accuracy']):.4f}  (cut off: no test; "
              f"median epoch {sorted(r['epoch_seconds'])[len(r['epoch_seconds']) // 2]} s)")
        continue
    tta = r["tta"]
    print(f"  {name:26s} {r['epochs_run']:4d} {r['best_val'].get('val_accuracy', float('nan')):.4f}  " +
          "  ".join(f"{k} {v['test_accuracy']:.4f}/{v['test_macro_f1']:.4f} (val {v['val_accuracy']:.4f}"
                    + (f", uncopied test {v['test_accuracy_uncopied']:.4f}" if "test_accuracy_uncopied" in v else "")
                    + (f" (copies at r >= {r['config']['copy_correlation']:g})" if "test_accuracy_uncopied" in v
                       and r["config"].get("copy_correlation", 1) < 1 else "") + ")"
                    for k, v in tta.items())
          + f"  disgust {r['test_acc_per_class']['disgust']:.3f} fear {r['test_acc_per_class']['fear']:.3f}  fit {r['fit_seconds']} s")
for name in ("cnn_graph", "cnn_graph_warm", "cnn_bf16", "cnn_fp32", "resnet18_112", "resnet18_224"):
    r = load(name)
    if r and r.get("partial"):
        print(f"{name}: cut off after {r['epochs_run']} epochs ({r['compile_choice']}), epoch seconds "
              f"{r['epoch_seconds'][:3]} ... {r['epoch_seconds'][-3:]}, best val acc {max(r['val_accuracy']):.4f}")
    elif r:
        print(f"{name}: {r['device_name']} amp {r['amp']}, compile {r['compile_choice']}, {r['epochs_run']} epochs, fit {r['fit_seconds']} s "
              f"(total {r['total_seconds']} s), median epoch {r['median_epoch_seconds']} s, "
              f"{r['median_train_images_per_second']} train img/s, around the steps {r['median_epoch_overhead_seconds']} s an epoch "
              f"({100 * r['overhead_fraction']:.1f}% of the loop), best val acc {max(r['val_accuracy']):.4f}, "
              f"final val acc {r['val_accuracy'][-1]:.4f}, test acc {r['test_accuracy']:.4f}, test macro-F1 {r['test_macro_f1']:.4f}")
    else:
        print(f"{name}: no result")
EOF
sleep 1  # let tee write the last lines to log.txt
