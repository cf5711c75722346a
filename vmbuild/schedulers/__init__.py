"""Hand-off to batch schedulers: an HTCondor submit description, a Slurm batch script and
the execute-node probe, all sized by one suspend-time estimate.

The build side may import this package; the runner bundle does not (the probe it ships is
:mod:`vmbuild.runner.probe`, standard library only, re-exported by :mod:`.probe`).
"""

from vmbuild.schedulers.condor import render_submit
from vmbuild.schedulers.estimate import SuspendEstimate, suspend_seconds
from vmbuild.schedulers.image import ImageFacts, SchedulerError, image_facts
from vmbuild.schedulers.options import CHECKPOINT_EXIT_CODE, SubmitOptions
from vmbuild.schedulers.slurm import render_sbatch
from vmbuild.schedulers.submit import SCHEDULERS, Scheduler, submit_now, write_submission

__all__ = [
    "CHECKPOINT_EXIT_CODE",
    "SCHEDULERS",
    "ImageFacts",
    "Scheduler",
    "SchedulerError",
    "SubmitOptions",
    "SuspendEstimate",
    "image_facts",
    "render_sbatch",
    "render_submit",
    "submit_now",
    "suspend_seconds",
    "write_submission",
]
