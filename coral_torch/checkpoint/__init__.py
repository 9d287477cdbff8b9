"""Python checkpoint objects <-> a skeleton plus named tensors, and the files that point at commits.

- :mod:`.adapters`: ``state_dict`` / Lightning checkpoint dicts <-> skeleton + ``WeightTensor``s, bit-exact.
- :mod:`.sharded`: DCP/FSDP2 sharded state: chunk names, resharding, consolidation.
- :mod:`.pointers`: the small JSON pointer file a ``save`` leaves in place of a checkpoint.
- :mod:`.checkpoint_files`: commit-to-file and forget-file, in one place.
"""
