"""The structure-aware fuzzer: strategies that build mostly-valid checkpoints of every format and mutate
their structure (strategies.py), and a harness that runs each through the CLI in a worker process under time
and memory limits and judges the outcome against issue 11's contract (harness.py)."""
