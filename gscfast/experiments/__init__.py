"""Studies built on gscfast, run by one runner (``runner``): ``gaussian`` (Figure 1 of Philipp,
Song & Carbonell 2018), ``cifar`` (their Figure 3), and the companion studies ``ghost``,
``shattered`` and ``vgg``. Each study module provides ``make_config``, ``make_study``, the job
function, ``write_outputs`` and its command (``add_arguments``, ``main``, ``HELP``)."""

from .runner import EngineError, Job, ResultsDirError, RunResult, Study, UsageError, job_seed, run

__all__ = [
    "STUDIES",
    "EngineError",
    "Job",
    "ResultsDirError",
    "RunResult",
    "Study",
    "UsageError",
    "job_seed",
    "run",
]

# Command name -> module (imported when the command is set up).
STUDIES = {
    "gaussian": "gscfast.experiments.gaussian",
    "cifar": "gscfast.experiments.cifar",
    "ghost": "gscfast.experiments.ghost",
    "shattered": "gscfast.experiments.shattered",
    "vgg": "gscfast.experiments.vgg",
}
