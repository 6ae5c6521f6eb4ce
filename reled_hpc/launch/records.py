"""Names of the records that submission leaves in run and sweep folders (read by `reled-hpc status`)."""

SUBMIT_FILE = "submit.json"  # in the run folder: what was submitted, for `reled-hpc status`
SWEEP_FILE = "sweep.json"  # in the sweep folder: the array job and its tasks
REQUEUE_FILE = "requeues.json"  # per run folder: how often the job was requeued, and when
