#!/usr/bin/env bash
# Issue #6 on a GPU: the shapes_cpu recipe at other model shapes, each given the steps that fit the recipe's
# CPU training time (2,800 steps of the tiny model, 544 ms each on the 2-core CPU in bf16), plus model=small at
# the recipe's 2,800 steps (about 5x that time). CPU ms/step per shape: `python benchmarks/bench_mfu.py
# --shapes tiny,384x4,256x8,384x6,512x4,512x6,small --precision bf16 --batch 12 --seq-len 352 --vocab 896`.
# All runs train side by side on one GPU, then each is evaluated on the test split (GenEval, captions with
# scene search) with CUDA-graph decoding. About 6 min on one H100 (README Results, session 19).
#
#   bash benchmarks/recipe_shapes.sh            # seed 1; SEED=2 bash benchmarks/recipe_shapes.sh for another
set -u
seed=${SEED:-1}
cache=${CACHE_DIR:-.cache/tokens}
start=$(date +%s)
mkdir -p runs

train_and_eval() {  # run name, overrides...
  local name=$1; shift
  chameleon-train experiment=shapes_cpu trainer=gpu seed="$seed" run_name="$name" data.cache_dir="$cache" \
      trainer.val_check_interval=500 "$@" > "runs/$name.log" 2>&1 || { echo "$name: training failed (runs/$name.log)"; return; }
  chameleon-eval ckpt="runs/$name/model" task=geneval split=test device=cuda cuda_graphs=true \
      out_dir="runs/$name/eval/gen_test" > "runs/$name.gen.log" 2>&1 || echo "$name: geneval failed"
  chameleon-eval ckpt="runs/$name/model" task=caption split=test scene_search.rounds=3 device=cuda cuda_graphs=true \
      out_dir="runs/$name/eval/cap_test" > "runs/$name.cap.log" 2>&1 || echo "$name: caption failed"
  echo "$name done at $(( $(date +%s) - start )) s"
}

# the token cache once, so the runs load it instead of waiting on one another's build
chameleon-train experiment=shapes_cpu trainer=gpu seed="$seed" run_name="shapes_cache_s$seed" data.cache_dir="$cache" \
    trainer.max_steps=1 trainer.val_check_interval=1 export_weights=false > /dev/null 2>&1
train_and_eval "g_tiny_2800_s$seed" &
train_and_eval "g_d384_l4_s$seed" model.dim=384 model.n_layers=4 model.n_heads=6 trainer.max_steps=1500 &
train_and_eval "g_d256_l8_s$seed" model.n_layers=8 trainer.max_steps=1480 &
train_and_eval "g_d384_l6_s$seed" model.dim=384 model.n_layers=6 model.n_heads=6 trainer.max_steps=1000 &
train_and_eval "g_d512_l4_s$seed" model.dim=512 model.n_layers=4 model.n_heads=8 trainer.max_steps=980 &
train_and_eval "g_d512_l6_s$seed" model.dim=512 model.n_layers=6 model.n_heads=8 trainer.max_steps=670 \
    trainer.val_check_interval=335 &
train_and_eval "g_small_2800_s$seed" model=small &
wait
for eval in gen_test cap_test; do
  python -m chameleon_lite.cli.compare_evals \
      $(for run in tiny_2800 d384_l4 d256_l8 d384_l6 d512_l4 d512_l6 small_2800; do
          echo -g "$run" "runs/g_${run}_s$seed/eval/$eval"; done)
done
