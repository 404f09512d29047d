"""`vaelab slurm timings` reads a task's stamped log: each phase from the line times the job script writes."""
from vaelab.slurm_timings import attempt_timings

FIRST_ATTEMPT = """\
2026-12-06 08:00:00.000000 vaelab: slurm-7-0 on n1, restart 0: start -S seed=1
2026-12-06 08:00:01.000000 vaelab: slurm-7-0 on n1, restart 0: cloned
2026-12-06 08:00:01.500000 Running stage 'prepare':
2026-12-06 08:00:02.000000 train: 55000 images, val: 5000 images, test: 10000 images -> data/prepared
2026-12-06 08:00:02.100000 prepare: done in 1.9 s
slurmstepd-n1: error: *** JOB 8 ON n1 CANCELLED AT 2026-12-06T08:00:03 DUE TO JOB REQUEUE ***
"""
SECOND_ATTEMPT = """\
2026-12-06 08:01:00.000000 vaelab: slurm-7-0 on n2, restart 1: start -S seed=1
2026-12-06 08:01:00.400000 vaelab: slurm-7-0 on n2, restart 1: cloned
2026-12-06 08:01:00.900000 Reproducing experiment 'slurm-7-0'
2026-12-06 08:01:01.000000 Stage 'prepare' didn't change, skipping
2026-12-06 08:01:01.200000 Running stage 'train':
2026-12-06 08:01:01.200100 > PYTHONPATH=src python pipeline/train.py data/prepared models reports/history.csv
2026-12-06 08:01:31.200000 epoch 8 (resumed from its checkpoint at epoch 2): val negative ELBO 229.61 nats/image
2026-12-06 08:01:31.300000 train: done in 30.0 s
2026-12-06 08:01:31.800000 Updating lock file 'dvc.lock'
2026-12-06 08:01:31.800100 
2026-12-06 08:01:31.900000 Running stage 'evaluate':
2026-12-06 08:01:31.900100 > PYTHONPATH=src python pipeline/evaluate.py data/prepared models reports/metrics.json
2026-12-06 08:01:40.900000 test_mse_per_pixel: 0.0573
2026-12-06 08:01:41.950000 evaluate: done in 10.0 s
2026-12-06 08:01:42.000000 
2026-12-06 08:01:42.100000 Ran experiment(s): slurm-7-0
2026-12-06 08:01:42.200000 vaelab: slurm-7-0 on n2, restart 1: ran
2026-12-06 08:01:43.200000 vaelab: slurm-7-0 on n2, restart 1: pushed
"""


def test_the_last_attempt_of_a_requeued_task_is_split_into_clone_stages_dvc_and_push():
    timings = attempt_timings(FIRST_ATTEMPT + SECOND_ATTEMPT)
    assert timings["node"] == "n2" and "prepare" not in timings
    expected = {"clone": 0.4, "train": 30.0, "evaluate": 10.0, "push": 1.0, "dvc": 1.8}  # 41.8 s between cloned and ran, 40 s of it in the stages
    assert {name: round(timings[name], 3) for name in expected} == expected
    assert round(timings["overhead"], 3) == 3.2


def test_a_task_that_has_not_pushed_has_no_timings_yet():
    assert attempt_timings(FIRST_ATTEMPT) is None
    assert attempt_timings("") is None
