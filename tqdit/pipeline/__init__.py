"""The job: model -> samples -> metrics -> results.json."""

from tqdit.pipeline.generate import generate, sample_labels
from tqdit.pipeline.job import run_job, summary_line

__all__ = ["generate", "run_job", "sample_labels", "summary_line"]
