"""How a trainer process ends, as the node runner and every backend read it (orchestrator/sweep.py).

Kept in the trainer, which imports nothing from the orchestrator; the orchestrator imports these.
"""

EXIT_OK = 0
EXIT_FAILED = 1      # the trainer (or a node runner whose seeds failed after their retries) gave up
EXIT_BAD_INPUT = 2   # bad configuration: one sentence, nothing created
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on request; run again to resume
