"""Cost (not a test): each zero-shot method's ImageNet recipe on --device, projected from measured iterations.

    python benchmarks/bench_imagenet.py --device cpu --threads 2 --json benchmarks/imagenet_cpu.json

No ImageNet copy is needed: each script runs as users run it (`--dataset imagenet --arch A`, the recipe's batch and
every other recipe flag at its default) for one warm-up epoch and one student epoch of --iters iterations, on a
random torchvision teacher and a one-image validation folder written to a temp folder (speed depends on neither).
From each epoch's own `charts/images_per_s` (evaluation excluded): seconds per warm-up (generator-only) iteration
and per student iteration, and the recipe's whole training projected as warm-up epochs x 200 x the first plus the
other epochs x 200 x the second. SynQ's synthesis (the recipe's images x Adam steps) is projected from the seconds per
step of a small batch, scaled linearly to the recipe's batch (--syn-batch), which a GPU would not be; its fine-tuning
and warm-up as the others'. The evaluation of the 50,000 validation images is not included.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--iters", type=int, default=3, help="iterations per measured epoch")
    p.add_argument("--methods", default="gdfq ait akt lrq synq")
    p.add_argument("--archs", default="resnet18 resnet50 mobilenet_v2")
    p.add_argument("--syn-batch", type=int, default=16, help="SynQ: the synthesis batch measured (scaled linearly)")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args()
    import torch
    from PIL import Image

    import common
    out = {"device": a.device if a.device != "cpu" else common.cpu_model(), "threads": a.threads or
           torch.get_num_threads(), "torch": torch.__version__, "iters": a.iters,
           "date": time.strftime("%Y-%m-%d"), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "val", common.imagenet_wnids()[0]))
        Image.new("RGB", (256, 256)).save(os.path.join(tmp, "val", common.imagenet_wnids()[0], "0.JPEG"))
        for arch in a.archs.split():
            teacher = os.path.join(tmp, f"{arch}.pth")
            torch.save(common.imagenet_model(arch).state_dict(), teacher)
            for m in a.methods.split():
                module = common.import_script(m)
                recipe = module.parse(["--dataset", "imagenet", "--arch", arch])
                n_syn = max(a.syn_batch, recipe.batch_size)  # a set at least one fine-tuning batch large
                extra = ["--num-images", str(n_syn), "--syn-batch", str(a.syn_batch), "--syn-iters", "6"] \
                    if m == "synq" else []
                cmd = [sys.executable, f"{m}.py", "--dataset", "imagenet", "--arch", arch, "--teacher", teacher,
                       "--data-dir", tmp, "--workers", "0", "--device", a.device, "--threads", str(a.threads),
                       "--epochs", "2", "--warmup-epochs", "1", "--iters-per-epoch", str(a.iters),
                       "--milestones-from", "train", "--out-dir", tmp, "--run-name", f"{m}-{arch}", *extra]
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"{m} {arch} failed: {r.stderr.strip().splitlines()[-1]}")
                with open(os.path.join(tmp, f"{m}-{arch}", "metrics.jsonl")) as f:
                    rows = [json.loads(line) for line in f]
                warm_batch = getattr(recipe, "calib_batch", recipe.batch_size)
                s_warm = warm_batch / rows[0]["charts/images_per_s"]
                s_train = recipe.batch_size / rows[1]["charts/images_per_s"]
                hours = (recipe.warmup_epochs * recipe.iters_per_epoch * s_warm
                         + (recipe.epochs - recipe.warmup_epochs) * recipe.iters_per_epoch * s_train) / 3600
                row = {"method": m, "arch": arch, "batch": recipe.batch_size, "epochs": recipe.epochs,
                       "warmup_epochs": recipe.warmup_epochs, "iters_per_epoch": recipe.iters_per_epoch,
                       "s_per_warmup_iter": round(s_warm, 3), "s_per_student_iter": round(s_train, 3),
                       "projected_training_hours": round(hours, 1)}
                if m == "synq":
                    step = [line for line in r.stdout.splitlines() if " s/step over steps 2-4" in line][0]
                    s_step = float(step.split()[1]) * recipe.syn_batch / a.syn_batch  # "synthesis: X s/step ..."
                    syn_hours = s_step * recipe.syn_iters * (recipe.num_images / recipe.syn_batch) / 3600
                    row.update(s_per_synthesis_step_at_recipe_batch=round(s_step, 2),
                               projected_synthesis_hours=round(syn_hours, 1))
                out["runs"].append(row)
                print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
