"""Jobs: the work that runs on queue workers, and the queue itself.

- :mod:`.queue`: the queue protocol, :class:`~.queue.JobInfo`, progress reporting from inside a job, and
  :func:`~.queue.get_queue` (RQ on Redis when ``REDIS_URL`` is set, else :mod:`.local`, in-process);
- :mod:`.rqueue`: the RQ queue; :mod:`.local`: the in-process queue;
- :mod:`.context`: what a job runs with, and Label Studio calls retried with backoff;
- :mod:`.prelabel`: pre-annotation of a project, one job per group;
- :mod:`.finetuning`: the fine-tune job of a project;
- :mod:`.worker`: ``cosod-worker``, an RQ worker that loads the pipeline once; :mod:`.gpu`: GPU slots;
  :mod:`.outage`: the worker's Redis connection, which waits out a Redis outage;
- :mod:`.coverage`: which groups lack a prediction of the serving version (``GET /jobs/coverage``).

RQ stores a job's function by dotted name. Jobs enqueued before this package existed name
``backend.jobs.prelabel_group`` and ``backend.jobs.finetune``; those names resolve here, so such jobs still
run after an upgrade. New jobs are enqueued under the modules' own names.
"""

from __future__ import annotations

from .enqueue import prelabel_project
from .finetuning import finetune
from .prelabel import prelabel_group

__all__ = ["finetune", "prelabel_group", "prelabel_project"]
