"""`crossview adapt --config configs/adapt.yaml`: one periodic re-adaptation run of a site, every step logged.

| step        | what                                                                                    |
|-------------|-----------------------------------------------------------------------------------------|
| lock        | `<state_dir>/lock` (flock): a second start while one runs exits at once, saying so     |
| run id      | the period (`period`, a strftime format; default one run per ISO week) or `--run-id`: a finished run |
|             | (`runs/<id>/done`) is not repeated, an interrupted one continues where it stopped       |
|             | (a CronJob or a timer may start a run twice)                                            |
| 1 collect   | the matcher's harvest (`GET /api/v1/harvest`) since the end of the last finished run, or within the |
|             | last `window_s`, into `runs/<id>/harvest` (a resumed download skips what it has)         |
| 2 split     | whole tracklets: `gate.holdout` of them held out for the gate, the rest linked into `train-harvest` |
| 3 current   | the registry's production model (checksum checked), else `baseline_model`               |
| 4 adapt     | the `train` config's method, source and schedule on the train harvest, in `runs/<id>/train` (resumed |
|             | from its checkpoint); the trunk starts from the production model's checkpoint when this job made it |
| 5 calibrate | the candidate's score calibration, fitted on the train harvest (`crossview calibrate`)  |
| 6 gate      | `trainer.gate` on both models: `gate.json` and `gate.md` in the run folder               |
| 7 register  | the candidate goes into the registry with its gate report; it is promoted (or starts a canary) |
|             | only when it passed and `promote` allows; a refused one stays a candidate, nothing changes on the edges |

The job talks to the matcher over its HTTP API only (`matcher.client`), so it runs on any machine with a
GPU and the labelled source: the matcher never runs training.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import Field

from crossview.kernel.config import _Strict, load_config, read_secret
from crossview.kernel.harvest import sidecar_path
from crossview.matcher.client import MatcherClient
from crossview.trainer import gate
from crossview.trainer.calibration import read_tracklets
from crossview.trainer.config import TrainConfig, load_train_config

log = logging.getLogger("crossview.adapt")


class JobMatcherConfig(_Strict):
    url: str = Field(pattern=r"^https?://", description="the matcher's HTTP API, e.g. http://10.0.0.2:8080")
    token_file: Path = Field(description="the matcher's API token (http.token_file), not the edges' read-only one")
    timeout_s: float = Field(300.0, gt=0, le=3600, description="longest one request may take (a model upload)")


class JobGateConfig(_Strict):
    holdout: float = Field(0.2, gt=0, lt=1, description="share of the harvest's tracklets kept out of training")
    min_gap_s: float = Field(2.0, gt=0, description="seconds between a tracklet's query and gallery crops")
    min_gain: float = Field(0.01, ge=-1, le=1, description="site mAP the candidate must gain (a fraction)")
    max_source_drop: float = Field(0.02, ge=0, le=1, description="source mAP the candidate may lose")
    max_ece_rise: float = Field(0.05, ge=0, le=1, description="calibration error the candidate may add")
    source: bool = Field(True, description="also score both models on the labelled source's held-out split")


class AdaptJobConfig(_Strict):
    matcher: JobMatcherConfig
    train: Path = Field(description="a train config (configs/train/*.yaml): method, source, schedule; the job sets "
                                    "its target (which the file may leave out), output_dir and name")
    state_dir: Path = Field(Path("runs/adapt"), description="runs, checkpoints and the job's state")
    period: str = Field("%G-W%V", min_length=1, description="strftime of the run id: one run per period")
    window_s: float | None = Field(None, gt=0, description="harvest of the last window_s; default: since the last run")
    min_tracklets: int = Field(10, ge=2, description="fewer harvested tracklets than this: nothing to adapt on yet")
    baseline_model: Path | None = Field(None, description="the model the edges run while the registry has no "
                                                          "production version (e.g. models/mobilenetv2-imagenet.onnx)")
    gate: JobGateConfig = JobGateConfig()
    promote: Literal["production", "canary", "never"] = Field(
        "production", description="what a candidate that passed the gate becomes")
    canary: list[str] = Field([], description="promote: canary: these edges first")
    canary_hold_s: float = Field(3600.0, ge=0, description="promote: canary: hold time before all edges")
    seed: int = Field(0, description="the tracklet hold-out draw")


ADAPT_PATH_KEYS = [("train",), ("state_dir",), ("baseline_model",), ("matcher", "token_file")]


def load_adapt_config(path: str | Path) -> AdaptJobConfig:
    cfg = load_config(path, AdaptJobConfig, ADAPT_PATH_KEYS)
    if not cfg.state_dir.is_absolute():  # the default, unresolved: beside the config, not wherever the job starts
        cfg = cfg.model_copy(update={"state_dir": Path(path).resolve().parent / cfg.state_dir})
    return cfg


@dataclass(frozen=True)
class Outcome:
    run_id: str
    status: Literal["busy", "done-before", "too-little-harvest", "passed", "refused"]
    message: str
    version: str | None = None


@contextmanager
def _locked(state_dir: Path):
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def run_job(cfg: AdaptJobConfig, run_id: str | None = None, now: float | None = None) -> Outcome:
    """One adapt run (see the module's table); safe to start twice."""
    now = time.time() if now is None else now
    run_id = run_id or datetime.fromtimestamp(now, timezone.utc).strftime(cfg.period)
    with _locked(cfg.state_dir) as ours:
        if not ours:
            return Outcome(run_id, "busy", f"another adapt run holds {cfg.state_dir / 'lock'}; nothing to do")
        return Job(cfg, run_id, now).run()


class Job:
    def __init__(self, cfg: AdaptJobConfig, run_id: str, now: float):
        self.cfg, self.run_id = cfg, run_id
        self.dir = cfg.state_dir / "runs" / run_id
        self.client = MatcherClient(cfg.matcher.url, read_secret(cfg.matcher.token_file, "matcher.token_file", "token"),
                                    timeout=cfg.matcher.timeout_s)
        self.plan = self._plan(now)

    def _plan(self, now: float) -> dict:
        """The run's harvest window, fixed at its first start so a resumed run collects the same crops."""
        path = self.dir / "plan.json"
        if path.exists():
            return json.loads(path.read_text())
        last = _read_json(self.cfg.state_dir / "state.json").get("harvest_until")
        since = now - self.cfg.window_s if self.cfg.window_s else last
        plan = {"since": since, "until": now}
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, plan)
        return plan

    def run(self) -> Outcome:
        if (self.dir / "done").exists():
            report = _read_json(self.dir / "outcome.json")
            return Outcome(self.run_id, "done-before", f"run {self.run_id} finished already: {report.get('message')}",
                           report.get("version"))
        log.info("adapt run %s in %s: harvest %s .. %s", self.run_id, self.dir, _when(self.plan["since"]),
                 _when(self.plan["until"]))
        harvest = self._collect()
        crops, tracklets = read_tracklets(harvest) if any(harvest.rglob("*.jpg")) else ([], [])
        if len(tracklets) < self.cfg.min_tracklets:
            (self.dir / "plan.json").unlink()  # the next start plans afresh, with what has arrived since
            return Outcome(self.run_id, "too-little-harvest",
                           f"{len(tracklets)} tracklet(s) ({len(crops)} crops) harvested since {_when(self.plan['since'])}, "
                           f"need adapt.min_tracklets {self.cfg.min_tracklets}: nothing adapted; the next run tries again")
        fit, held = gate.split_tracklets(tracklets, self.cfg.gate.holdout, self.cfg.seed)
        log.info("2/7 split: %d tracklets to train on, %d held out for the gate", len(fit), len(held))
        train_harvest = self._link(crops, fit)
        current, production = self._current()
        train_cfg = self._train_config(train_harvest, production)
        candidate = self._adapt(train_cfg)
        report = self._gate(harvest, fit, held, current, candidate, train_cfg)
        return self._register(candidate, report)

    # ------------------------------------------------------------------ steps
    def _collect(self) -> Path:
        out = self.dir / "harvest"
        out.mkdir(parents=True, exist_ok=True)  # an empty harvest is a harvest of no tracklets
        n = self.client.download_harvest(out, since=self.plan["since"], until=self.plan["until"])
        log.info("1/7 collect: %d crops downloaded (%.1f MB), %d there from before, %d gone meanwhile, from %s into %s",
                 n["downloaded"], n["bytes"] / 1e6, n["skipped"], n["gone"], self.cfg.matcher.url, out)
        return out

    def _link(self, crops, fit) -> Path:
        """The training tracklets' crops and sidecars as a harvest of their own (hard links: no copies)."""
        out = self.dir / "train-harvest"
        shutil.rmtree(out, ignore_errors=True)
        root = self.dir / "harvest"
        for t in fit:
            for row in t.rows:
                crop = crops[row].path
                for src in (crop, sidecar_path(crop)):
                    dst = out / src.relative_to(root)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.link(src, dst)
        return out

    def _current(self) -> tuple[Path, dict | None]:
        """The model the edges run now, and its registry entry (None: the baseline, nothing in production)."""
        entry = self.client.production()
        if entry is None:
            if self.cfg.baseline_model is None:
                raise ValueError("the registry has no production model and adapt.baseline_model is not set: "
                                 "nothing to gate the candidate against")
            log.info("3/7 current: no production version; the baseline %s", self.cfg.baseline_model)
            return self.cfg.baseline_model, None
        path = self.dir / "current.onnx"
        self.client.download_model(entry, path)
        log.info("3/7 current: production %s (sha256 %s... checked)", entry["version"], entry["sha256"][:12])
        return path, entry

    def _train_config(self, train_harvest: Path, production: dict | None) -> TrainConfig:
        target = {"kind": "harvest", "root": train_harvest, "evaluate": False}
        base = load_train_config(self.cfg.train, defaults={"target": target})  # a file without one is fine: set here
        start = self._checkpoint_of(production)
        model = {**base.model.model_dump(), **({"init_from": start} if start else {})}
        log.info("4/7 adapt: method %s from %s", base.method,
                 f"the production model's checkpoint {start}" if start else f"model.pretrained {base.model.pretrained}")
        return TrainConfig.model_validate({
            **base.model_dump(), "name": f"{base.name}-{self.run_id}", "output_dir": self.dir / "train", "model": model,
            "target": target})

    def _checkpoint_of(self, production: dict | None) -> Path | None:
        path = self.cfg.state_dir / "checkpoints" / f"{production['version']}.pt" if production else None
        return path if path is not None and path.exists() else None

    def _adapt(self, train_cfg: TrainConfig) -> Path:
        from crossview.trainer.calibration import calibrate_model
        from crossview.trainer.engine import Trainer

        candidate = self.dir / "candidate.onnx"
        if candidate.exists():
            log.info("4/7 adapt: done before (%s)", candidate)
            return candidate
        resume = (Path(train_cfg.output_dir) / "last.pt").exists()
        trained = Trainer(train_cfg, resume=resume).run()
        partial = self.dir / ".candidate.partial.onnx"
        try:
            cal = calibrate_model(trained, train_cfg.target.root, partial, min_gap_s=self.cfg.gate.min_gap_s)
            log.info("5/7 calibrate: %s", cal.describe())
        except ValueError as e:
            log.warning("5/7 calibrate: the candidate stays uncalibrated (%s)", e)
            shutil.copyfile(trained, partial)
        os.replace(partial, candidate)
        return candidate

    def _gate(self, harvest: Path, fit, held, current: Path, candidate: Path, train_cfg: TrainConfig) -> gate.GateReport:
        g = self.cfg.gate
        source = gate.Source(train_cfg.source.kind, train_cfg.source.root, train_cfg.cache_dir) if g.source else None
        scores = [gate.score_model(m, harvest, held, fit, source, g.min_gap_s) for m in (candidate, current)]
        report = gate.decide(*scores, gate.GateRule(g.min_gain, g.max_source_drop, g.max_ece_rise))
        _write_json(self.dir / "gate.json", report.to_dict())
        (self.dir / "gate.md").write_text(report.to_markdown())
        log.info("6/7 gate:\n%s", report.to_markdown())
        return report

    def _register(self, candidate: Path, report: gate.GateReport) -> Outcome:
        entry = self.client.register_model(candidate, report.to_dict())
        version = entry["version"]
        shutil.copyfile(self.dir / "train" / "last.pt", _mkparent(self.cfg.state_dir / "checkpoints" / f"{version}.pt"))
        if report.passed and self.cfg.promote != "never":
            canary = self.cfg.canary if self.cfg.promote == "canary" else []
            state = self.client.promote(version, canary, self.cfg.canary_hold_s)["state"]
            message = f"{version} passed the gate and is now {state}" + (f" on {', '.join(canary)}" if canary else "")
        elif report.passed:
            message = f"{version} passed the gate; registered as a candidate (adapt.promote: never)"
        else:
            message = f"{version} refused by the gate ({'; '.join(report.reasons)}); registered as a candidate, " \
                      "the edges keep their model"
        log.info("7/7 register: %s", message)
        outcome = Outcome(self.run_id, "passed" if report.passed else "refused", message, version)
        _write_json(self.dir / "outcome.json", {"status": outcome.status, "message": message, "version": version})
        _write_json(self.cfg.state_dir / "state.json", {"harvest_until": self.plan["until"], "run": self.run_id,
                                                       "version": version, "status": outcome.status})
        (self.dir / "done").write_text(datetime.now(timezone.utc).isoformat(timespec="seconds") + "\n")
        return outcome


def _when(ts: float | None) -> str:
    return "the beginning" if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
