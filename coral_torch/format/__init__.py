"""Formats: how coral-torch describes what it stores, defined once. Pure, no I/O.

- :mod:`.dtypes`, :mod:`.planes` (+ the C ``coral_torch._planes``): dtype names and byte-plane layout.
- :mod:`.codec` (encoder), :mod:`.codec_reader` (decoder), :mod:`.codec_layout`: the blob encoding.
- :mod:`.weight_tensor`: ``WeightTensor`` and the content-hash rule.
- :mod:`.delta`: ``Delta``/``DeltaType`` and the lossless delta encodings.
- :mod:`.manifest`: a commit's manifest and the one commit-id rule.
- :mod:`.refnames`: ref names (builders and validators).
- :mod:`.documents`: the canonical JSON encoding of remote documents and their checksum.
- :mod:`.objects`: the one description of a stored object (weight or delta) and its mapping to HDF5
  attributes and remote metadata documents; the payload checksum.

Every store and push/pull use these; a format change touches one module.
"""
