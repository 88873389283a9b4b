"""Launch stage (sweeps): a small Optuna (4.x) sweeper — ask a batch of trials, run them through the
configured launcher (our Ray Jobs launcher: each trial is a Ray Job), tell Optuna their main metric.

Why not hydra-optuna-sweeper 1.3.0: it installs beside our pins but pins optuna<3 (2.10.1, 2021); with
SQLAlchemy 2 its persistent storage fails (AssertionError in get_current_version), and a failed trial
raises out of the whole study. This sweeper keeps its search-space grammar
(`interval(a,b)`, `tag(log, interval(a,b))`, `range(a,b,step)`, `choice(a,b)` / `a,b`), so its
configs carry over, and adds: a failed trial is told FAIL and the search goes on.
"""

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class OptunaSearchConf:
    _target_: str = "hydra_plugins.orchestrator_sweeper.optuna_search.OptunaSearchSweeper"
    n_trials: int = 8
    """Trials in total."""
    n_jobs: int = 2
    """Trials asked per batch (the launcher runs a batch concurrently, as resources allow)."""
    direction: Optional[str] = None
    """maximize | minimize the launcher's metric (hydra.launcher.metric); null follows hydra.launcher.metric_mode."""
    sampler: str = "tpe"
    """tpe | random | qmc."""
    seed: Optional[int] = None
    study_name: Optional[str] = None
    storage: Optional[str] = None
    """e.g. sqlite:////shared/studies.db to resume a study (null = in memory)."""
    params: Dict[str, str] = field(default_factory=dict)
    """Search space, e.g. {optim.lr: "tag(log, interval(1e-4, 1e-2))", engine: "zero1,zero2"}."""


ConfigStore.instance().store(group="hydra/sweeper", name="optuna_search", node=OptunaSearchConf, provider="bert-orchestrator")


def _distribution(override: Override):
    import optuna.distributions as D

    value = override.value()
    if isinstance(value, ChoiceSweep):
        return D.CategoricalDistribution([v for v in value.list])
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return D.IntDistribution(int(value.start), int(value.end), log=log_scale)
        return D.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, RangeSweep):
        # Hydra's range() excludes stop; Optuna's high must be on the grid start + k*step
        last = math.ceil((value.stop - value.start) / value.step) - 1
        if last < 0:
            raise ValueError(f"{override.input_line}: an empty range")
        if all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            return D.IntDistribution(value.start, value.start + last * value.step, step=value.step)
        return D.FloatDistribution(value.start, value.start + last * value.step, step=value.step)
    raise ValueError(f"{override.input_line}: not a search range (use interval/range/choice or a,b)")


class OptunaSearchSweeper(Sweeper):
    def __init__(self, **params: Any) -> None:
        self.params = OptunaSearchConf(**{k: v for k, v in params.items() if k != "_target_"})
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _sampler(self):
        import optuna

        name = self.params.sampler.lower()
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=self.params.seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=self.params.seed)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=self.params.seed)
        raise ValueError(f"hydra.sweeper.sampler: unknown sampler '{self.params.sampler}' (tpe | random | qmc)")

    def sweep(self, arguments: List[str]) -> Any:
        from orchestrator.extras import require

        require("optuna", "sweeps", "hydra/sweeper", "hydra/sweeper=optuna_search")
        import optuna

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        parsed = parser.parse_overrides([f"{k}={v}" for k, v in self.params.params.items()] + list(arguments))
        space: Dict[str, Any] = {}
        fixed: List[str] = []
        for ov in parsed:
            if ov.is_sweep_override():
                space[ov.get_key_element()] = _distribution(ov)
            else:
                fixed.append(ov.input_line)
        if not space:
            raise ValueError("optuna_search: nothing to search (give e.g. 'optim.lr=tag(log, interval(1e-4,1e-2))')")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        direction = self.params.direction or (
            "minimize" if str(OmegaConf.select(self.config, "hydra.launcher.metric_mode", default="max")) == "min" else "maximize")
        study = optuna.create_study(
            study_name=self.params.study_name, storage=self.params.storage, sampler=self._sampler(),
            direction=direction, load_if_exists=bool(self.params.storage),
        )
        log.info(f"Optuna {optuna.__version__} study: {self.params.n_trials} trials, {self.params.n_jobs} per batch, "
                 f"{direction}, sampler {self.params.sampler}, space {sorted(space)}")
        done = 0
        while done < self.params.n_trials:
            n = min(self.params.n_jobs, self.params.n_trials - done)
            trials = [study.ask(space) for _ in range(n)]
            batch = [fixed + [f"{k}={t.params[k]}" for k in space] for t in trials]
            returns = self.launcher.launch(batch, initial_job_idx=done)
            for trial, ret in zip(trials, returns):
                value = ret._return_value if ret.status == JobStatus.COMPLETED else None
                if value is None or not isinstance(value, (int, float)) or math.isnan(float(value)):
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning(f"trial {trial.number} failed: {ret._return_value}")
                else:
                    study.tell(trial, float(value))
            done += n
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        result: Dict[str, Any] = {"name": "optuna_search", "n_trials": len(study.trials), "n_completed": len(completed)}
        if completed:
            result.update(best_params=dict(study.best_params), best_value=study.best_value)
            log.info(f"best value {study.best_value} with {study.best_params}")
        OmegaConf.save(OmegaConf.create(result), sweep_dir / "optimization_results.yaml")
        return result
