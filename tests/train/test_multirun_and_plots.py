import csv
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY_TRAIN

from chameleon_lite.cli.plot_runs import find_runs
from chameleon_lite.cli.plot_runs import main as plot_main


@pytest.mark.slow
def test_two_job_cpu_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY_TRAIN if not o.startswith("trainer.max_steps")]
    proc = subprocess.run([sys.executable, "-m", "chameleon_lite.cli.train", "-m", "optim.lr=1e-3,3e-3",
                           *overrides, "trainer.max_steps=2", "callbacks.loss_curve=null", "export_weights=false",
                           f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"],
                          check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = find_runs([sweep])
    assert len(runs) == 2
    # each job ran with its own swept value: Hydra's record of the job, the checkpoint's hyper-parameters and
    # the learning rate the optimizer really used (warm-up step 0 of 2: half the peak)
    swept = {}
    for job in sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir()):
        lr_override = [o for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
                       if o.startswith("optim.lr=")]
        assert len(lr_override) == 1, lr_override
        lr = float(lr_override[0].split("=", 1)[1])
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["optim"]["lr"] == lr
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["hyper_parameters"]["optim"]["lr"] == lr and ckpt["global_step"] == 2
        with open(job / "logs" / "metrics.csv") as f:
            used = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")}
        assert used[0] == pytest.approx(lr / 2), (job.name, used)
        swept[job.name] = lr
    assert swept == {"0": 1e-3, "1": 3e-3}
    out = plot_main([str(sweep), "--out", str(tmp_path / "runs.png")])
    assert out.is_file() and out.stat().st_size > 1000


def test_ablation_overlay_defines_the_four_runs():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from chameleon_lite.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["experiment=ablation_qknorm", "run_dir=/tmp/x"], return_hydra_config=True)
    assert cfg.optim.lr >= 1e-2
    params = cfg.hydra.sweeper.params
    assert str(params["model.qk_norm"]) == "true,false" and str(params["optim.z_loss"]).endswith(",0.0")


def test_plot_runs_without_logs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no logs/metrics.csv"):
        plot_main([str(tmp_path)])


def test_two_sweeps_with_the_same_subdirs_keep_every_run(tmp_path):
    for sweep in ("a", "b"):
        for job in ("0", "1"):
            (tmp_path / sweep / job / "logs").mkdir(parents=True)
            (tmp_path / sweep / job / "logs" / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    assert sorted(find_runs([tmp_path / "a", tmp_path / "b"])) == ["a/0", "a/1", "b/0", "b/1"]
    assert sorted(find_runs([tmp_path / "a"])) == ["0", "1"]  # one root: labels as Hydra's subdirs
