

def test_csv_logger_keeps_the_history_of_a_resumed_run(tmp_path):
    from chameleon_lite.train.callbacks import read_metrics_csv
    from chameleon_lite.train.loggers import CSVLogger

    first = CSVLogger(save_dir=tmp_path, name="logs", version="")
    for step in range(3):
        first.log_metrics({"train/loss": 3.0 - step}, step=step)
    first.save()
    resumed = CSVLogger(save_dir=tmp_path, name="logs", version="")  # Lightning's own would delete metrics.csv here
    for step in (2, 3):  # the resumed run redoes step 2 (after its last checkpoint), then goes on
        resumed.log_metrics({"train/loss": 10.0 + step, "val/loss": 1.0}, step=step)
    resumed.save()
    series = read_metrics_csv(tmp_path / "logs" / "metrics.csv")
    assert series["train/loss"] == [(0, 3.0), (1, 2.0), (2, 12.0), (3, 13.0)]
    assert series["val/loss"] == [(2, 1.0), (3, 1.0)]
