"""`dbr sweep`: the paper's tables as one command, on one machine or a Slurm cluster.

A sweep expands datasets x held-out domains x methods x seeds into trials (plan.py),
each a `dbr train` then a `dbr eval` subprocess run by trial.py, exactly what a
Slurm job runs; launchers.py hands the trials to an engine (one after another,
one per GPU, or submitit on Slurm); status.py prints the plan, what is done and
the GPU-hours. Everything lives in one sweep folder, so `dbr report <folder>`
reads its trials as DomainBed reads its seeds.
"""
