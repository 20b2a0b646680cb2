"""The experiment runner behind ``flex-pbs-run`` and ``flex-pbs-sweep``: structured configs and
their validation, the tasks, and the reports they write."""
