"""train.loggers=[tensorboard, wandb] with W&B offline (WANDB_MODE=offline, local files, no
network, no login): what the offline run holds, read back by W&B's own reader of its .wandb
transaction log (`wandb leet inspect --json`), against metrics.jsonl; the run config; one run
id across a resume at a round boundary and a resume that rewinds; W&B switched on for an
existing run dir; the errors (package absent, unknown logger)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_run import tiny_cfg

from perpo_jax.config import ConfigError, config_to_dict
from perpo_jax.train.loggers import RUN_ID_FILE
from perpo_jax.train.loop import config_differences, train
from perpo_jax.train.run_log import EVENTS_FILE, EventsFile, RunLog

# offline, quiet, no console capture (it would fight pytest's), no system-metrics sampler,
# no git / code / machine probing
WANDB_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
             "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_MACHINE_INFO": "true",
             "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}


@pytest.fixture(scope="module")
def wandb_dir(tmp_path_factory):
    pytest.importorskip("wandb")  # requirements-test.txt pins it; the errors below need none
    root = tmp_path_factory.mktemp("wandb_dir")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**WANDB_ENV, "WANDB_DIR": str(root)}.items():
            mp.setenv(key, value)
        yield root


def _segments(wandb_root: Path, run_id: str) -> list[list[dict]]:
    """Each invocation's records of run `run_id`, oldest first, as W&B's reader prints them."""
    files = list(wandb_root.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
    out = []
    for path in files:
        text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                               str(path)], capture_output=True, text=True, check=True).stdout
        out.append([json.loads(line) for line in text.splitlines() if line.strip()])
    return sorted(out, key=lambda records: _run_record(records)["start_time"])


def _run_record(records: list[dict]) -> dict:
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    return run


def _history(records: list[dict]) -> dict[int, dict]:
    """W&B step -> the row's values (W&B's own _runtime/_step/_timestamp left out)."""
    rows = {}
    for r in records:
        if r["type"] == "history":
            item = r["history"]["item"]
            rows[item["_step"]] = {k: v for k, v in item.items() if not k.startswith("_")}
    return rows


def _scalars(row: dict) -> dict:
    """A metrics.jsonl row's numbers as W&B names them: <kind>/<name>."""
    return {f"{row['kind']}/{k}": v for k, v in row.items()
            if k not in ("kind", "step") and isinstance(v, (int, float))}


def _row(rows: list[dict], kind: str, step: int) -> dict:
    (row,) = [r for r in rows if r["kind"] == kind and r["step"] == step]
    return row


def _same(wandb_row: dict, expected: dict) -> bool:
    """Equal names and values; W&B writes a NaN as the string "NaN"."""
    if wandb_row.keys() != expected.keys():
        return False
    got = {k: float("nan") if v == "NaN" else v for k, v in wandb_row.items()}
    return all(got[k] == e or (math.isnan(e) and math.isnan(got[k]))
               for k, e in expected.items())


@pytest.fixture(scope="module")
def two_invocations(shared, wandb_dir, tmp_path_factory):
    """One run (2 rounds x 2 updates) in two invocations: stopped at step 3 (inside round 1),
    then resumed from checkpoint 2 as after a kill that lost checkpoint 3: a resume that
    rewinds, at a round boundary (round 1 is sampled and logged again)."""
    _, data = shared
    tmp = tmp_path_factory.mktemp("wandb_run")
    cfg = tiny_cfg(tmp, "data.task=test_digits", f"data.data_dir={data.data_dir}",
                   "train.loggers=[tensorboard,wandb]", "train.wandb_project=perpo-jax-test",
                   "train.wandb_name=tiny")
    out = cfg.train.out_dir
    assert train(cfg, data=data, progress=False, stop_at_step=3).steps == 3
    first = RunLog(out).records()
    shutil.rmtree(os.path.join(out, "checkpoints", "3"))
    assert train(cfg, data=data, progress=False).steps == 4
    run_id = Path(out, RUN_ID_FILE).read_text().strip()
    return cfg, first, RunLog(out).records(), run_id, _segments(wandb_dir, run_id)


def _union(segments: list[list[dict]]) -> dict[int, dict]:
    rows = {}
    for records in segments:
        for step, row in _history(records).items():
            assert step not in rows, "an invocation logged a step W&B already held"
            rows[step] = row
    return rows


def test_offline_run_holds_the_metrics_of_metrics_jsonl(two_invocations):
    cfg, first, final, _, segments = two_invocations
    # metrics.jsonl is exact across the rewind: the rewound step 3 and round 1's record
    # (logged again by the resume from checkpoint 2) appear once
    assert [(r["kind"], r["step"]) for r in final] == [
        ("round", 0), ("step", 1), ("step", 2), ("round", 2), ("step", 3), ("step", 4)]
    assert len(segments) == 2
    rows = _union(segments)
    # W&B's steps are metrics.jsonl's (a step's record and the next round's share the row);
    # the steps W&B already held keep the values it got first (the rewound step 3 stays the
    # first invocation's); the resumed invocation adds step 4
    expected = {
        0: _scalars(_row(first, "round", 0)),
        1: _scalars(_row(first, "step", 1)),
        2: {**_scalars(_row(first, "step", 2)), **_scalars(_row(first, "round", 2))},
        3: _scalars(_row(first, "step", 3)),
        4: _scalars(_row(final, "step", 4)),
    }
    assert rows.keys() == expected.keys()
    for step, row in expected.items():
        assert _same(rows[step], row), (step, rows[step], row)
    assert set(_history(segments[1])) == {4}
    assert {"step/loss", "step/pair_accuracy", "step/mean_reward", "round/lists_kept"} <= \
        set(rows[2])
    # TensorBoard is truncated like metrics.jsonl: round 1's record once
    events = EventsFile(os.path.join(cfg.train.out_dir, "tb", EVENTS_FILE)).events()
    assert sum(e.step == 2 and any(v.tag.startswith("round/") for v in e.summary.value)
               for e in events) == 1


def test_config_and_names_logged_and_the_resume_continues_the_run_id(two_invocations):
    cfg, _, _, run_id, segments = two_invocations
    runs = [_run_record(records) for records in segments]
    assert [r["run_id"] for r in runs] == [run_id] * 2
    assert all(r["resume"] for r in runs)  # every invocation: wandb.init(resume="allow")
    assert {r["project"] for r in runs} == {"perpo-jax-test"}
    assert {r["display_name"] for r in runs} == {"tiny"}
    config = json.loads(json.dumps(config_to_dict(cfg)))
    for r in runs:
        logged = {k: v for k, v in r["config"]["update"].items() if k != "_wandb"}
        assert logged == config
    assert config["train"]["loggers"] == ["tensorboard", "wandb"]


def test_a_round_resumed_at_the_last_wandb_row_goes_to_the_next_row(wandb_dir, tmp_path):
    out = str(tmp_path / "run")
    stopped = RunLog(out, loggers=["wandb"])  # stopped (SIGTERM) at the end of round 0
    stopped.truncate_after(0)
    stopped.write({"lists_kept": 3}, step=0, kind="round")
    stopped.write({"loss": 1.0}, step=1)
    stopped.write({"loss": 0.5}, step=2)
    stopped.close()
    resumed = RunLog(out, loggers=["wandb"])
    resumed.truncate_after(2)
    resumed.write({"lists_kept": 4}, step=2, kind="round")  # W&B's row 2 is closed
    resumed.write({"loss": 0.25}, step=3)
    resumed.close()
    run_id = Path(out, RUN_ID_FILE).read_text().strip()
    first, second = _segments(wandb_dir, run_id)
    assert _history(first) == {0: {"round/lists_kept": 3}, 1: {"step/loss": 1},
                               2: {"step/loss": 0.5}}
    assert _history(second) == {3: {"round/lists_kept": 4, "step/loss": 0.25}}
    assert [(r["kind"], r["step"]) for r in RunLog(out).records()] == [
        ("round", 0), ("step", 1), ("step", 2), ("round", 2), ("step", 3)]


def test_wandb_joining_an_existing_run_dir_gets_its_records_first(wandb_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.delenv("WANDB_DIR")  # W&B's files then go into the run dir
    out = str(tmp_path / "run")
    before = RunLog(out)  # an invocation without W&B
    before.write({"loss": 1.0}, step=1)
    before.write({"loss": 0.5, "gap": float("nan"), "note": "text"}, step=2)
    before.write({"lists_kept": 3}, step=2, kind="round")  # its round was cut short
    log = RunLog(out, loggers=["wandb"], run_config={"train": {"wandb_project": "p"}})
    log.truncate_after(2)  # resumes from checkpoint 2: round 1 is run (and logged) again
    log.write({"lists_kept": 4}, step=2, kind="round")
    log.write({"loss": 0.25}, step=3)
    log.close()
    run_id = Path(out, RUN_ID_FILE).read_text().strip()
    (records,) = _segments(Path(out), run_id)
    assert list(Path(out, "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    rows = _history(records)
    assert rows.keys() == {1, 2, 3}
    assert _same(rows[1], {"step/loss": 1.0})
    assert _same(rows[2], {"step/loss": 0.5, "step/gap": float("nan"), "round/lists_kept": 4.0})
    assert _same(rows[3], {"step/loss": 0.25})
    assert [(r["kind"], r["step"]) for r in RunLog(out).records()] == [
        ("step", 1), ("step", 2), ("round", 2), ("step", 3)]


def test_absent_wandb_is_one_clear_error_before_anything_runs(shared, tmp_path, monkeypatch):
    _, data = shared
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = tiny_cfg(tmp_path, "data.task=test_digits", f"data.data_dir={data.data_dir}",
                   "train.loggers=[tensorboard,wandb]")
    with pytest.raises(ConfigError, match=r"train\.loggers: 'wandb' needs the wandb package.*"
                                          r"pip install wandb==0\.31\.0"):
        train(cfg, data=data, progress=False)
    assert not os.path.exists(cfg.train.out_dir)  # failed before a file or a compile
    with pytest.raises(ConfigError, match="pip install wandb==0.31.0"):
        RunLog(str(tmp_path / "direct"), loggers=["wandb"])
    RunLog(str(tmp_path / "tb_only")).close()  # the default needs no wandb


def test_logger_keys_are_validated_and_do_not_define_the_run(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.loggers: \['mlflow'\] not among "
                                          r"tensorboard, wandb"):
        tiny_cfg(tmp_path, "train.loggers=[tensorboard,mlflow]")
    with pytest.raises(ConfigError, match=r"train\.loggers: \['wandb'\] listed more than once"):
        tiny_cfg(tmp_path, "train.loggers=[wandb,wandb]")
    with pytest.raises(ConfigError, match=r"train\.wandb_project: empty"):
        tiny_cfg(tmp_path, "train.wandb_project=' '")
    assert tiny_cfg(tmp_path).train.loggers == ["tensorboard"]
    assert tiny_cfg(tmp_path, "train.loggers=[]").train.loggers == []
    # turning W&B on or renaming it is no reason to refuse a resume
    saved = config_to_dict(tiny_cfg(tmp_path))
    del saved["train"]["loggers"]  # a checkpoint saved before the key existed
    assert config_differences(saved, tiny_cfg(
        tmp_path, "train.loggers=[wandb]", "train.wandb_project=p", "train.wandb_entity=e",
        "train.wandb_name=n")) == []
