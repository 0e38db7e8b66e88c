"""The FSDP round trip: a checkpoint, converted to DCP, loaded into a model sharded with FSDP2 across
real torch.distributed processes, compared shard by shard with the source, saved back, and resharded.

``worker`` is what each rank runs (``python -m ckptcheck.roundtrip`` under ``torchrun``, single- or
multi-node); ``launch`` starts the ranks on one machine with torch's own elastic launcher.
"""
