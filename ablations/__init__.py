"""The paper's ablation Tables 3 and 4 (``python ablations/run.py``; modules: see its docstring)."""

from dico.runtime import configure_cpu_threads

# Before torch loads (the modules here import it), in every process that imports this package first: the runner,
# and a SLURM job unpickling its row (ablations.slurm.RowJob). Rank 0 times every row in its own process, and with
# spinning OpenMP workers on a shared 2-core machine one crops16 row's throughput turns took 4 minutes, not seconds.
configure_cpu_threads()
